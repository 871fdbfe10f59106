//! Where to listen or connect: AF_VSOCK, or a `unix:`/`tcp:` stand-in, behind one type.
//!
//! This module owns the address syntax (`8001`, `vsock:[CID:]PORT`, `unix:PATH`, `tcp:IP:PORT`),
//! binding and accepting ([`Listener`]), connecting ([`Endpoint::connect`]) and the resulting
//! byte stream ([`Stream`]). Everything above it handles the three transports through the same
//! code; only this file knows which one is in use. Peer addresses are rendered for logs as
//! `vsock:CID:PORT`, `unix:PATH` or `tcp:IP:PORT`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

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
            Endpoint::Vsock { cid, port } if *cid == VMADDR_CID_ANY => {
                write!(f, "vsock:any:{port}")
            }
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl Endpoint {
    /// Binds a listener. A stale unix socket file left by an earlier run is replaced; any other
    /// existing file at that path is an error rather than something we delete.
    pub async fn bind(&self) -> io::Result<Listener> {
        match self {
            Endpoint::Vsock { cid, port } => {
                VsockListener::bind(VsockAddr::new(*cid, *port)).map(Listener::Vsock)
            }
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
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

fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket exists at this path",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A bound listener of any transport.
#[derive(Debug)]
pub enum Listener {
    Vsock(VsockListener),
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Accepts one connection and describes its peer for logs.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                Ok((
                    Stream::Vsock(s),
                    format!("vsock:{}:{}", peer.cid(), peer.port()),
                ))
            }
            Listener::Unix(l) => {
                let (s, peer) = l.accept().await?;
                let peer = match peer.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_owned(),
                };
                Ok((Stream::Unix(s), peer))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), format!("tcp:{peer}")))
            }
        }
    }

    /// The bound address, e.g. to learn the port chosen for `tcp:127.0.0.1:0`.
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Vsock(l) => {
                let a = l.local_addr()?;
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
        assert_eq!(
            "8001".parse::<Endpoint>().unwrap().to_string(),
            "vsock:any:8001"
        );
        assert_eq!(
            "vsock:any:8001".parse::<Endpoint>().unwrap().to_string(),
            "vsock:any:8001"
        );
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

        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let err = Endpoint::Unix(file.clone()).bind().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
