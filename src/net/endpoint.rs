//! Where to listen or connect: AF_VSOCK, or a `unix:`/`tcp:` stand-in, behind one type.
//!
//! This module owns the address syntax (`8001`, `vsock:[CID:]PORT`, `unix:PATH`, `tcp:IP:PORT`),
//! binding and accepting ([`Listener`]), adopting a listening socket passed by systemd socket
//! activation ([`Listener::from_passed_fd`]), connecting ([`Endpoint::connect`]) and the
//! resulting byte stream ([`Stream`]). Everything above it handles the three transports through
//! the same code; only this file knows which one is in use. Peer addresses are rendered for logs
//! as `vsock:CID:PORT`, `unix:PATH` or `tcp:IP:PORT`.
//!
//! A vsock listener is the `vsock` crate's socket in a tokio `AsyncFd`, accepted here rather than
//! through `tokio_vsock::VsockListener`, whose only way to adopt an existing descriptor panics
//! when it cannot register it; bound and passed vsock listeners share this one accept path.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_ANY};

/// A listen or connect address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        let parse_u32 = |what: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{what} {v:?} in {s:?} is not a number"))
        };
        if let Some(rest) = s.strip_prefix("vsock:") {
            return match rest.split_once(':') {
                Some((cid, port)) => {
                    let cid = if cid.eq_ignore_ascii_case("any") || cid == "-1" {
                        VMADDR_CID_ANY
                    } else {
                        parse_u32("CID", cid)?
                    };
                    Ok(Endpoint::Vsock {
                        cid,
                        port: parse_u32("port", port)?,
                    })
                }
                None => Ok(Endpoint::Vsock {
                    cid: VMADDR_CID_ANY,
                    port: parse_u32("port", rest)?,
                }),
            };
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: unix: needs a socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr.parse::<SocketAddr>().map(Endpoint::Tcp).map_err(|_| {
                format!("{s:?}: tcp: needs IP:PORT, like tcp:127.0.0.1:8001 or tcp:[::1]:8001")
            });
        }
        if let Ok(port) = s.parse::<u32>() {
            return Ok(Endpoint::Vsock {
                cid: VMADDR_CID_ANY,
                port,
            });
        }
        Err(format!(
            "{s:?} is not an address: use a vsock port (8001), vsock:CID:PORT, unix:PATH or tcp:IP:PORT"
        ))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // As written in LISTEN: a bare port means any CID.
            Endpoint::Vsock { cid, port } if *cid == VMADDR_CID_ANY => write!(f, "vsock:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl Endpoint {
    /// The message for a failed [`Endpoint::bind`] of this address, for a listener that is
    /// `purpose` (`"listen"`, `"listen for metrics"`): the address, the OS error and a hint that
    /// fits that error. `in_use` is the caller's guess at who holds an address in use; the other
    /// errors with a fix get theirs, and the rest none, so that an address this host does not
    /// have is never blamed on another process.
    pub fn bind_error(&self, purpose: &str, e: &io::Error, in_use: &'static str) -> String {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => Some(in_use),
            io::ErrorKind::AddrNotAvailable => Some(match self {
                Endpoint::Vsock { .. } => "no such vsock CID on this host: listen on a port alone (any CID) or on this host's CID",
                _ => "that IP address is not one of this host's: check `ip addr`, or listen on 0.0.0.0",
            }),
            io::ErrorKind::NotFound => Some("the socket file's directory does not exist: create it first (RuntimeDirectory= under systemd)"),
            io::ErrorKind::PermissionDenied => Some(match self {
                Endpoint::Unix(_) => "no permission to create the socket file in that directory",
                _ => "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            }),
            _ => None,
        };
        match hint {
            Some(hint) => format!("cannot {purpose} on {self}: {e} ({hint})"),
            None => format!("cannot {purpose} on {self}: {e}"),
        }
    }

    /// Binds a listener. A stale unix socket file left by an earlier run is replaced; any other
    /// existing file at that path is an error rather than something we delete.
    pub async fn bind(&self) -> io::Result<Listener> {
        match self {
            Endpoint::Vsock { cid, port } => {
                let listener = vsock::VsockListener::bind_with_cid_port(*cid, *port)?;
                // The vsock crate listens with a backlog of 128, and unlike TCP a full vsock
                // accept queue resets new connects at once: a burst of enclave connections while
                // the daemon is busy must queue, not fail. A second listen() raises the backlog.
                // SAFETY: listen(2) on a socket descriptor the listener owns.
                if unsafe { libc::listen(listener.as_raw_fd(), libc::SOMAXCONN) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                vsock_listener(listener)
            }
            Endpoint::Unix(path) => {
                remove_stale_socket(path).await?;
                UnixListener::bind(path).map(Listener::Unix)
            }
            Endpoint::Tcp(addr) => TcpListener::bind(addr).await.map(Listener::Tcp),
        }
    }

    /// Opens a stream to this endpoint.
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Vsock { cid, port } => VsockStream::connect(VsockAddr::new(*cid, *port))
                .await
                .map(Stream::Vsock),
            Endpoint::Unix(path) => UnixStream::connect(path).await.map(Stream::Unix),
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

/// Removes a socket file that nothing listens on any more (left by a process that ended without
/// removing it); refuses one that a live process serves, which removing would take over
/// silently: that process would keep running with no way to reach it.
async fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A non-blocking connect: refused means stale; accepted, or a full backlog
            // (EAGAIN), or no answer within the second means a live listener.
            let probe = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                tokio::net::UnixStream::connect(path),
            )
            .await;
            match probe {
                Ok(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => std::fs::remove_file(path),
                _ => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "in use by another process: a live process accepts connections on this \
                     socket file (stop it, or listen on another path)",
                )),
            }
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket exists at this path",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Registers a listening vsock socket with the runtime (non-blocking).
fn vsock_listener(listener: vsock::VsockListener) -> io::Result<Listener> {
    listener.set_nonblocking(true)?;
    // SAFETY: the listener owns its descriptor (an OwnedFd) and never replaces or closes it
    // while it is inside the AsyncFd, so the descriptor stays valid and the same until the
    // AsyncFd is dropped.
    let registered = unsafe { AsyncFd::register(listener) };
    registered
        .map(Listener::Vsock)
        .map_err(|e| e.into_parts().1)
}

/// A bound listener of any transport.
#[derive(Debug)]
pub enum Listener {
    Vsock(AsyncFd<vsock::VsockListener>),
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Adopts a listening socket passed by the service manager (socket activation): a stream
    /// socket of family AF_VSOCK, AF_UNIX, AF_INET or AF_INET6 on which listen() was called.
    /// Anything else is an error that says which `.socket` setting makes it right.
    pub fn from_passed_fd(fd: OwnedFd) -> Result<Listener, String> {
        let n = fd.as_raw_fd();
        let what = |e: String| format!("socket-activation descriptor {n}: {e}");
        let domain = sockopt(&fd, libc::SO_DOMAIN).map_err(|e| {
            what(if e.raw_os_error() == Some(libc::ENOTSOCK) {
                "is not a socket (use ListenStream= in the .socket unit)".to_owned()
            } else {
                format!("cannot inspect it: {e}")
            })
        })?;
        let kind =
            sockopt(&fd, libc::SO_TYPE).map_err(|e| what(format!("cannot inspect it: {e}")))?;
        if kind != libc::SOCK_STREAM {
            return Err(what(
                "is not a stream socket (use ListenStream=, not ListenDatagram= or \
                 ListenSequentialPacket=, in the .socket unit)"
                    .to_owned(),
            ));
        }
        let listening = sockopt(&fd, libc::SO_ACCEPTCONN)
            .map_err(|e| what(format!("cannot inspect it: {e}")))?;
        if listening == 0 {
            return Err(what(
                "is not listening (the .socket unit must not set Accept=yes)".to_owned(),
            ));
        }
        let adopted = match domain {
            libc::AF_VSOCK => vsock_listener(vsock::VsockListener::from(fd)),
            libc::AF_UNIX => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)
                    .and_then(|()| UnixListener::from_std(std))
                    .map(Listener::Unix)
            }
            libc::AF_INET | libc::AF_INET6 => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(std))
                    .map(Listener::Tcp)
            }
            other => {
                return Err(what(format!(
                    "has address family {other}, not vsock, unix, IPv4 or IPv6"
                )))
            }
        };
        adopted.map_err(|e| what(format!("cannot use it: {e}")))
    }

    /// Accepts one connection and describes its peer for logs.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for one connection, as [`Listener::accept`], so that several listeners can be
    /// served by one loop.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, String)>> {
        match self {
            Listener::Vsock(l) => loop {
                let mut ready = ready!(l.poll_read_ready(cx))?;
                match ready.try_io(|inner| inner.get_ref().accept()) {
                    Ok(Ok((s, peer))) => {
                        let peer = format!("vsock:{}:{}", peer.cid(), peer.port());
                        return Poll::Ready(VsockStream::new(s).map(|s| (Stream::Vsock(s), peer)));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            },
            Listener::Unix(l) => {
                let (s, peer) = ready!(l.poll_accept(cx))?;
                let peer = match peer.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_owned(),
                };
                Poll::Ready(Ok((Stream::Unix(s), peer)))
            }
            Listener::Tcp(l) => {
                let (s, peer) = ready!(l.poll_accept(cx))?;
                s.set_nodelay(true)?;
                Poll::Ready(Ok((Stream::Tcp(s), format!("tcp:{peer}"))))
            }
        }
    }

    /// The bound address, e.g. to learn the port chosen for `tcp:127.0.0.1:0`.
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Vsock(l) => {
                let a = l.get_ref().local_addr()?;
                Ok(Endpoint::Vsock {
                    cid: a.cid(),
                    port: a.port(),
                })
            }
            Listener::Unix(l) => Ok(Endpoint::Unix(
                l.local_addr()?
                    .as_pathname()
                    .map(PathBuf::from)
                    .unwrap_or_default(),
            )),
            Listener::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr()?)),
        }
    }
}

/// An int-valued SOL_SOCKET option of `fd`.
fn sockopt(fd: &OwnedFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own; the descriptor
    // is borrowed for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A connected byte stream of any transport.
#[derive(Debug)]
pub enum Stream {
    Vsock(VsockStream),
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Vsock(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Vsock($s) => $e,
            Stream::Unix($s) => $e,
            Stream::Tcp($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    /// Shuts down the write direction only (a half-close): the peer reads EOF and may still reply.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let p = |s: &str| s.parse::<Endpoint>();
        assert_eq!(
            p("8001"),
            Ok(Endpoint::Vsock {
                cid: VMADDR_CID_ANY,
                port: 8001
            })
        );
        assert_eq!(
            p("vsock:8001"),
            Ok(Endpoint::Vsock {
                cid: VMADDR_CID_ANY,
                port: 8001
            })
        );
        assert_eq!(
            p("vsock:3:8001"),
            Ok(Endpoint::Vsock { cid: 3, port: 8001 })
        );
        assert_eq!(
            p("vsock:any:5"),
            Ok(Endpoint::Vsock {
                cid: VMADDR_CID_ANY,
                port: 5
            })
        );
        assert_eq!(
            p("unix:/run/x.sock"),
            Ok(Endpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            p("tcp:127.0.0.1:80"),
            Ok(Endpoint::Tcp("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            p("tcp:[::1]:80"),
            Ok(Endpoint::Tcp("[::1]:80".parse().unwrap()))
        );
        for bad in [
            "",
            "unix:",
            "tcp:localhost:80",
            "tcp:127.0.0.1",
            "vsock:x:1",
            "vsock:1:y",
            "8001x",
            "http://x",
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "vsock:3:8001",
            "unix:/tmp/a.sock",
            "tcp:127.0.0.1:9",
            "tcp:[::1]:9",
        ] {
            assert_eq!(s.parse::<Endpoint>().unwrap().to_string(), s);
        }
        // Any CID is shown as LISTEN writes it, the form route labels use.
        for any in ["8001", "vsock:8001", "vsock:any:8001", "vsock:-1:8001"] {
            assert_eq!(any.parse::<Endpoint>().unwrap().to_string(), "vsock:8001");
        }
    }

    #[tokio::test]
    async fn passed_descriptors_are_adopted_or_refused_with_the_fix() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = Listener::from_passed_fd(OwnedFd::from(tcp)).unwrap();
        assert_eq!(listener.local_endpoint().unwrap(), Endpoint::Tcp(addr));
        let client = tokio::spawn(async move { TcpStream::connect(addr).await });
        let (_s, peer) = listener.accept().await.unwrap();
        assert!(peer.starts_with("tcp:127.0.0.1:"), "{peer}");
        client.await.unwrap().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passed.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let listener = Listener::from_passed_fd(OwnedFd::from(unix)).unwrap();
        assert_eq!(listener.local_endpoint().unwrap(), Endpoint::Unix(path));

        let refused = |fd: OwnedFd| match Listener::from_passed_fd(fd) {
            Ok(_) => panic!("adopted a descriptor it cannot serve"),
            Err(e) => e,
        };
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = refused(OwnedFd::from(udp));
        assert!(
            e.contains("not a stream socket") && e.contains("ListenStream="),
            "{e}"
        );
        let unbound = unlistened_tcp_socket();
        let e = refused(unbound);
        assert!(
            e.contains("is not listening") && e.contains("Accept=yes"),
            "{e}"
        );
        let file = std::fs::File::open("/dev/null").unwrap();
        let e = refused(OwnedFd::from(file));
        assert!(e.contains("is not a socket"), "{e}");
        assert!(e.starts_with("socket-activation descriptor "), "{e}");
    }

    /// A TCP socket on which listen() was never called.
    fn unlistened_tcp_socket() -> OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: socket() returns a new descriptor, checked below, that nothing else owns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            OwnedFd::from_raw_fd(fd)
        }
    }

    #[tokio::test]
    async fn unix_bind_replaces_stale_socket_but_not_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("p.sock");
        let ep = Endpoint::Unix(sock.clone());
        drop(ep.bind().await.unwrap());
        assert!(
            sock.exists(),
            "the socket file stays after the listener is dropped"
        );
        let listener = ep.bind().await.expect("a stale socket is replaced");
        let client = tokio::spawn({
            let ep = ep.clone();
            async move { ep.connect().await }
        });
        let (_stream, peer) = listener.accept().await.unwrap();
        assert!(peer.starts_with("unix:"));
        client.await.unwrap().unwrap();

        // The listener is alive: its socket file is not taken over.
        let err = ep
            .bind()
            .await
            .map(|_| ())
            .expect_err("a live socket is not replaced");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        drop(listener);

        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let err = Endpoint::Unix(file.clone()).bind().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
