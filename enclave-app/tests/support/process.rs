//! The binaries under test, run as processes inside the test's network namespace.
//!
//! Owns:
//! * where the binaries are: [`APP`] (`enclave-app`, built by cargo for these tests) and
//!   [`proxy_bin`] (`nitro-vsock-proxy`, the root package's binary in the same target directory:
//!   `cargo test --workspace` / `make test` build it; `cargo test -p enclave-app` alone does not);
//! * [`Proc`]: a long-running process (server, forwarder, proxy, HTTPS stand-in) whose output is
//!   captured continuously, which waits for readiness without connecting, can be signalled and
//!   waited for, and is killed on drop, printing its logs if the test is failing;
//! * [`run`] → [`Output`]: a one-shot process (the client) with a deadline.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The enclave-app binary.
pub const APP: &str = env!("CARGO_BIN_EXE_enclave-app");

/// How long a process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The nitro-vsock-proxy binary, next to enclave-app.
///
/// # Panics
/// If it has not been built.
pub fn proxy_bin() -> PathBuf {
    let path = Path::new(APP).with_file_name("nitro-vsock-proxy");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p nitro-vsock-proxy` (make test and \
         cargo test --workspace build it)",
        path.display()
    );
    path
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running process, killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Starts `program args...` with `RUST_LOG=info` (unless `env` sets it) and `env`.
    pub fn spawn<S: AsRef<OsStr>>(
        name: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Proc {
        let mut cmd = Command::new(program.as_ref());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", program.as_ref()));
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![
            capture(stdout, output.clone()),
            capture(stderr, output.clone()),
        ];
        Proc {
            name: name.to_owned(),
            child,
            output,
            readers,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far (stdout and stderr, by line).
    pub fn logs(&self) -> String {
        lock(&self.output).clone()
    }

    /// How many lines printed so far contain every one of `needles`.
    pub fn count_lines(&self, needles: &[&str]) -> usize {
        lock(&self.output)
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }

    /// Waits (up to [`READY_TIMEOUT`]) until at least `n` lines contain all of `needles`, then
    /// returns how many do: output arrives through a pipe and a reader thread, so a line the
    /// process wrote before the test observed its effect may not have been captured yet.
    pub async fn wait_lines(&self, needles: &[&str], n: usize) -> usize {
        super::wait_until(READY_TIMEOUT, || self.count_lines(needles) >= n).await;
        self.count_lines(needles)
    }

    /// Polls the output until it contains `needle`; whether it did within `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, || lock(&self.output).contains(needle)).await
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// How many sockets the process holds open now (its listeners and accepted connections; a
    /// connection still in the listen backlog is not one of them).
    pub fn open_sockets(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.child.id());
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "cannot signal {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    ///
    /// # Panics
    /// With the logs, if it is still running then.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}; logs:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `ready()` holds.
    ///
    /// # Panics
    /// With the logs, if the process exits first or [`READY_TIMEOUT`] passes.
    pub async fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.exited() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "{} exited ({status}) before it was ready; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready after {READY_TIMEOUT:?}; logs:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} logs -----\n{}----- end of {} logs -----",
                self.name,
                self.logs(),
                self.name
            );
        }
    }
}

fn capture(pipe: impl Read + Send + 'static, out: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => lock(&out).push_str(&String::from_utf8_lossy(&line)),
            }
        }
    })
}

/// What a one-shot process did.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `program args...` to completion.
///
/// # Panics
/// If it cannot start or does not exit within `timeout` (it is killed then).
pub async fn run<S: AsRef<OsStr>>(
    program: impl AsRef<OsStr>,
    args: &[S],
    timeout: Duration,
) -> Output {
    let mut cmd = tokio::process::Command::new(program.as_ref());
    cmd.args(args)
        .stdin(Stdio::null())
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{:?} {:?} did not exit within {timeout:?}",
                program.as_ref(),
                args.iter().map(|a| a.as_ref()).collect::<Vec<_>>()
            )
        })
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", program.as_ref()));
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
