//! Running the real `nitro-vsock-proxy` binary, and connecting to it as the enclave.
//!
//! Owns:
//! * [`Proxy`]: spawns `env!("CARGO_BIN_EXE_nitro-vsock-proxy")` (inside the caller's
//!   network namespace, see `netns`), captures stdout/stderr continuously into shared
//!   buffers (reader threads, so the pipes never fill), waits for log lines, readiness
//!   and exit, sends signals, and kills the process on drop (printing its logs if the
//!   test is panicking);
//! * [`run_to_exit`] → [`Exit`]: one-shot invocations (`--version`, config errors, ...);
//! * [`connect`] / [`try_connect`] → [`Conn`]: a client stream to a listen address
//!   (`tcp:IP:PORT` or `unix:PATH`), i.e. the enclave side of the proxy, with half-close
//!   support;
//! * [`ListenAddr`] / [`is_listening`]: listen-address parsing and a side-effect-free
//!   "is something listening there" check.
//!
//! Readiness is checked by looking for a listening socket in `/proc/thread-self/net/*`
//! rather than by connecting: a probe connection would be proxied like any other (DNS
//! check, upstream connect) and skew the DNS query and upstream accept counters tests
//! assert on.

use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};

use super::netns;

/// Path of the binary under test (built by cargo for integration tests).
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_nitro-vsock-proxy");

/// How long [`Proxy::wait_ready`] waits for the listener.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(20);

/// Captured output of a child process.
#[derive(Default)]
struct Output {
    stdout: String,
    stderr: String,
    /// stdout and stderr interleaved line by line, in arrival order.
    combined: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which stream a reader thread copies.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Copies `pipe` line by line into `out` until EOF (the process exited and closed it).
fn spawn_reader(
    pipe: impl Read + Send + 'static,
    which: Stream,
    out: Arc<Mutex<Output>>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("proxy-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let mut out = lock(&out);
                        match which {
                            Stream::Stdout => out.stdout.push_str(&text),
                            Stream::Stderr => out.stderr.push_str(&text),
                        }
                        out.combined.push_str(&text);
                    }
                }
            }
        })
        .expect("cannot spawn a thread to capture the proxy's output")
}

/// Builds the command for the binary under test: piped stdout/stderr, null stdin,
/// `NO_COLOR=1`, and `RUST_LOG=debug` unless `env` sets `RUST_LOG`.
fn command<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(PROXY_BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
        cmd.env("RUST_LOG", "debug");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Spawns `cmd` and starts the output reader threads.
fn spawn(mut cmd: Command) -> (Child, Arc<Mutex<Output>>, Vec<JoinHandle<()>>) {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {PROXY_BIN}: {e}"));
    let output = Arc::new(Mutex::new(Output::default()));
    let stdout = child.stdout.take().expect("child stdout is piped");
    let stderr = child.stderr.take().expect("child stderr is piped");
    let readers = vec![
        spawn_reader(stdout, Stream::Stdout, output.clone()),
        spawn_reader(stderr, Stream::Stderr, output.clone()),
    ];
    (child, output, readers)
}

/// The child process and, once reaped, its exit status.
struct ChildState {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildState {
    /// Non-blocking: reaps the child if it exited. Returns the exit status if it has.
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .expect("waitpid on the proxy process failed");
        }
        self.status
    }
}

/// A running `nitro-vsock-proxy` process. Killed (SIGKILL) and reaped on drop; if the
/// test is panicking at that moment, its captured logs are printed to stderr.
pub struct Proxy {
    state: Mutex<ChildState>,
    pid: u32,
    output: Arc<Mutex<Output>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Spawns the binary with `args`, `RUST_LOG=debug` and `NO_COLOR=1`.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S]) -> Proxy {
        Self::spawn_with_env(args, &[])
    }

    /// Spawns the binary with `args` and extra environment variables (which override the
    /// defaults `RUST_LOG=debug`, `NO_COLOR=1`).
    pub fn spawn_with_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Proxy {
        Self::from_command(command(args, env))
    }

    fn from_command(cmd: Command) -> Proxy {
        let (child, output, readers) = spawn(cmd);
        Proxy {
            pid: child.id(),
            state: Mutex::new(ChildState {
                child,
                status: None,
            }),
            output,
            readers,
        }
    }

    /// Spawns the proxy with its open-file limit (soft and hard) set to `limit`, so that
    /// accept() runs into EMFILE after a few connections.
    pub fn spawn_with_nofile_limit<S: AsRef<OsStr>>(args: &[S], limit: u64) -> Proxy {
        use std::os::unix::process::CommandExt;
        let mut cmd = command(args, &[]);
        // SAFETY: setrlimit is async-signal-safe; the closure touches no locks or allocations.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::from_command(cmd)
    }

    /// Spawns the proxy in a mount namespace of its own where each `(file, target)` is
    /// bind-mounted over `target` (e.g. a test's hosts file over /etc/hosts), so the proxy reads
    /// the test's system configuration and the host's files stay untouched.
    pub fn spawn_with_bind_mounts<S: AsRef<OsStr>>(args: &[S], binds: &[(&Path, &str)]) -> Proxy {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::process::CommandExt;
        let cstr = |b: &[u8]| CString::new(b).expect("a path without NUL");
        let binds: Vec<(CString, CString)> = binds
            .iter()
            .map(|(src, dst)| (cstr(src.as_os_str().as_bytes()), cstr(dst.as_bytes())))
            .collect();
        let root = cstr(b"/");
        let mut cmd = command(args, &[]);
        // SAFETY: between fork and exec the closure only makes system calls on memory prepared
        // before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (src, dst) in &binds {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                Ok(())
            });
        }
        Self::from_command(cmd)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything written so far to stdout and stderr, interleaved by line.
    pub fn logs(&self) -> String {
        lock(&self.output).combined.clone()
    }

    /// Everything written so far to stdout.
    pub fn stdout(&self) -> String {
        lock(&self.output).stdout.clone()
    }

    /// Everything written so far to stderr.
    pub fn stderr(&self) -> String {
        lock(&self.output).stderr.clone()
    }

    /// Polls the captured output until it contains `needle`; returns whether it did
    /// within `timeout`.
    /// Waits (at most `timeout`) for a log line containing `needle`, and returns the first one;
    /// panics with the logs if none comes.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        if !self.wait_for_log(needle, timeout).await {
            panic!(
                "no log line with {needle:?} within {timeout:?}:\n{}",
                self.logs()
            );
        }
        self.logs()
            .lines()
            .find(|line| line.contains(needle))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{needle:?} is in the logs but on no one line"))
    }

    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if lock(&self.output).combined.contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Writes `yaml` to `config`, sends SIGHUP, and waits until the logs hold `outcome` (e.g.
    /// "allowlist reloaded" or "reload failed") `nth` times.
    ///
    /// # Panics
    /// With the captured logs, if that does not happen within 10 s.
    pub async fn reload_with(&self, config: &Path, yaml: &str, outcome: &str, nth: usize) {
        std::fs::write(config, yaml).expect("cannot write the configuration file");
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&self.output).combined.matches(outcome).count() < nth {
            assert!(
                Instant::now() < deadline,
                "expected {outcome:?} #{nth} after SIGHUP with {yaml:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (up to [`READY_TIMEOUT`]) until something listens on `listen`
    /// (`tcp:IP:PORT` or `unix:PATH`), without connecting to it (see module docs).
    ///
    /// # Panics
    /// With the captured logs, if the process exits first or the timeout elapses.
    pub async fn wait_ready(&self, listen: &str) {
        let addr = ListenAddr::parse(listen);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // Bound first: in an `if let` scrutinee the guard would live across the await.
            let exited = lock(&self.state).poll_exit();
            if let Some(status) = exited {
                // Give the reader threads a moment to drain the pipes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "proxy exited ({status}) before listening on {listen}; logs:\n{}",
                    self.logs()
                );
            }
            if addr.is_listening() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "proxy not listening on {listen} after {READY_TIMEOUT:?}; logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`, `libc::SIGHUP`) to the process. A no-op
    /// once the process has been reaped (its pid might be reused).
    pub fn signal(&self, sig: i32) {
        let mut state = lock(&self.state);
        if state.poll_exit().is_some() {
            return;
        }
        let pid = i32::try_from(self.pid).expect("pid fits in pid_t");
        // SAFETY: plain syscall; the child is not reaped yet, so the pid is still ours.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            panic!("kill({pid}, {sig}) failed: {}", io::Error::last_os_error());
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = lock(&self.state).poll_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        lock(&self.state).poll_exit().is_none()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if state.poll_exit().is_none() {
            let _ = state.child.kill();
            state.status = state.child.wait().ok();
        }
        drop(state);
        // The pipes are closed now, so the readers finish promptly; waiting for them makes
        // the logs below complete. Bounded, in case the proxy leaked its pipes to a
        // grandchild that is still alive.
        join_readers(std::mem::take(&mut self.readers), Duration::from_secs(2));
        if std::thread::panicking() {
            eprintln!(
                "----- nitro-vsock-proxy (pid {}) logs -----\n{}----- end of proxy logs -----",
                self.pid,
                self.logs()
            );
        }
    }
}

/// Joins the output reader threads, giving up (detaching them) after `timeout`.
fn join_readers(readers: Vec<JoinHandle<()>>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for reader in readers {
        if reader.is_finished() {
            let _ = reader.join();
        }
    }
}

/// The outcome of [`run_to_exit`].
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary once with `args` (`RUST_LOG=debug`, `NO_COLOR=1`) and returns its
/// exit status, stdout and stderr. Synchronous: fine to call inside an async test body
/// for these short runs.
///
/// # Panics
/// If it does not exit within `timeout` (it is killed; the output is in the message).
pub fn run_to_exit<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Exit {
    run_to_exit_with_env(args, &[], timeout)
}

/// [`run_to_exit`] with extra environment variables (overriding the defaults).
pub fn run_to_exit_with_env<S: AsRef<OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Exit {
    let (mut child, output, readers) = spawn(command(args, env));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .expect("waitpid on the proxy process failed")
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            join_readers(readers, Duration::from_secs(2));
            let out = lock(&output);
            panic!(
                "{PROXY_BIN} did not exit within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                out.stdout, out.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    join_readers(readers, Duration::from_secs(2));
    let out = lock(&output);
    Exit {
        status,
        stdout: out.stdout.clone(),
        stderr: out.stderr.clone(),
    }
}

/// A parsed listen address: `tcp:IP:PORT` (IPv6 as `tcp:[::1]:PORT`) or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `tcp:IP:PORT` / `unix:PATH`.
    ///
    /// # Panics
    /// On any other form (e.g. `vsock:`, which tests cannot connect to).
    pub fn parse(listen: &str) -> ListenAddr {
        if let Some(rest) = listen.strip_prefix("tcp:") {
            let addr = rest
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| {
                    // Also accept an unbracketed IPv6 address: `tcp:::1:8000`.
                    let (ip, port) = rest.rsplit_once(':')?;
                    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
                })
                .unwrap_or_else(|| panic!("bad tcp listen address {listen:?}: want tcp:IP:PORT"));
            ListenAddr::Tcp(addr)
        } else if let Some(path) = listen.strip_prefix("unix:") {
            assert!(!path.is_empty(), "empty unix listen path in {listen:?}");
            ListenAddr::Unix(PathBuf::from(path))
        } else {
            panic!("unsupported listen address {listen:?} in tests: want tcp:IP:PORT or unix:PATH")
        }
    }

    /// Whether a socket in the current thread's network namespace is listening here (see
    /// `netns::tcp_listening` / `netns::unix_listening`; no connection is made).
    pub fn is_listening(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => netns::tcp_listening(*addr),
            ListenAddr::Unix(path) => netns::unix_listening(path),
        }
    }
}

/// `ListenAddr::parse(listen).is_listening()`.
pub fn is_listening(listen: &str) -> bool {
    ListenAddr::parse(listen).is_listening()
}

/// A client connection to a listen address: the "enclave" side of the proxy.
/// Implements `AsyncRead + AsyncWrite`; `shutdown()` half-closes (shuts down writing).
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connects to `listen` (`tcp:IP:PORT` or `unix:PATH`).
///
/// # Panics
/// If the connection fails; use [`try_connect`] to test refusals.
pub async fn connect(listen: &str) -> Conn {
    try_connect(listen)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {listen}: {e}"))
}

/// A TCP connection to `listen` (`tcp:IP:PORT` or `IP:PORT`) from the source address `source`
/// (an address of 127.0.0.0/8, all on `lo`): another peer, as the proxy sees it.
pub async fn connect_from(source: &str, listen: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(from).unwrap();
    let to: SocketAddr = listen.trim_start_matches("tcp:").parse().unwrap();
    socket
        .connect(to)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {to} from {source}: {e}"))
}

/// Whether the proxy closed `stream` (EOF or reset) within `wait` without sending a byte;
/// panics if the connection is still open then.
pub async fn closed_without_a_byte(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the connection is still open after {wait:?}"),
    }
}

/// Connects to `listen` (`tcp:IP:PORT` or `unix:PATH`), returning the error if any.
pub async fn try_connect(listen: &str) -> io::Result<Conn> {
    match ListenAddr::parse(listen) {
        ListenAddr::Tcp(addr) => Ok(Conn::Tcp(TcpStream::connect(addr).await?)),
        ListenAddr::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path).await?)),
    }
}

impl Conn {
    /// Writes `request`, half-closes, and reads the response until EOF, all within
    /// `timeout` (a `TimedOut` error otherwise).
    pub async fn round_trip(&mut self, request: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
        let exchange = async {
            self.write_all(request).await?;
            self.shutdown().await?;
            let mut response = Vec::new();
            self.read_to_end(&mut response).await?;
            Ok(response)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "round_trip timed out",
                ))
            })
    }

    /// Reads until EOF within `timeout`. Handy to assert the proxy closed the
    /// connection (e.g. a denied destination yields `Ok(empty)` or a reset error).
    pub async fn read_to_eof(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        let mut data = Vec::new();
        match tokio::time::timeout(timeout, self.read_to_end(&mut data)).await {
            Ok(result) => result.map(|_| data),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "read_to_eof timed out",
            )),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
