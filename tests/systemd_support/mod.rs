//! Test doubles for the service manager's side of the systemd protocols, shared by the
//! `systemd_notify`, `socket_activation`, `reload`, `region` and `graceful_stop` tests
//! (`mod systemd_support;`):
//! * [`NotifySocket`]: a unix datagram socket standing in for systemd's `NOTIFY_SOCKET`; it
//!   records every notification (`READY=1\nSTATUS=...`) in arrival order;
//! * [`Daemon`]: any command (e.g. `systemd-socket-activate ... nitro-vsock-proxy ...`) with
//!   stdout and stderr in one temporary file, so its logs can be read at any time and the file's
//!   device and inode can be handed over as `JOURNAL_STREAM`, as systemd does; killed on drop;
//! * [`count`] / [`wait_for_count`]: how often a line occurs in the logs.
//!
//! Each test file uses a subset, hence `dead_code` is allowed here.

#![allow(dead_code)]

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fake `NOTIFY_SOCKET`: receives and keeps every datagram.
pub struct NotifySocket {
    path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir` and starts recording.
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("cannot bind the fake NOTIFY_SOCKET {path:?}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set_read_timeout on the notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = std::thread::Builder::new()
            .name("fake-notify-socket".into())
            .spawn({
                let messages = messages.clone();
                let stop = stop.clone();
                move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while !stop.load(Ordering::Relaxed) {
                        match socket.recv(&mut buf) {
                            Ok(n) => lock(&messages)
                                .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                            Err(e)
                                if e.kind() == io::ErrorKind::WouldBlock
                                    || e.kind() == io::ErrorKind::TimedOut => {}
                            Err(e) => panic!("fake NOTIFY_SOCKET: recv failed: {e}"),
                        }
                    }
                }
            })
            .expect("cannot spawn the notify socket reader");
        NotifySocket {
            path,
            messages,
            stop,
            reader: Some(reader),
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }

    /// Every notification so far, in arrival order.
    pub fn messages(&self) -> Vec<String> {
        lock(&self.messages).clone()
    }

    /// Notifications that contain the line `line` (e.g. `READY=1`).
    pub fn with_line(&self, line: &str) -> Vec<String> {
        self.messages()
            .into_iter()
            .filter(|m| m.lines().any(|l| l == line))
            .collect()
    }

    /// Waits until a notification satisfies `pred`; returns its index and text.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self
                .messages()
                .into_iter()
                .enumerate()
                .find(|(_, m)| pred(m))
            {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until a notification after index `after` has the line `line`; returns its index.
    pub async fn wait_for_line_after(
        &self,
        after: Option<usize>,
        line: &str,
        timeout: Duration,
    ) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .messages()
                .iter()
                .enumerate()
                .skip(after.map_or(0, |i| i + 1))
                .find(|(_, m)| m.lines().any(|l| l == line))
                .map(|(i, _)| i);
            if found.is_some() {
                return found;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        if std::thread::panicking() {
            eprintln!("----- notifications -----\n{:#?}", self.messages());
        }
    }
}

/// A child process whose stdout and stderr go to one temporary file.
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Spawns `cmd` (stdin null; stdout and stderr to the log file). With `journal_stream`,
    /// `JOURNAL_STREAM` is set to the log file's `DEV:INODE`, as systemd sets it for a service
    /// whose output goes to the journal.
    pub fn spawn(mut cmd: Command, journal_stream: bool) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir for the daemon's log");
        let log = dir.path().join("output.log");
        let file = std::fs::File::create(&log).expect("create the daemon's log file");
        let meta = file.metadata().expect("stat the daemon's log file");
        if journal_stream {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let err = file.try_clone().expect("dup the daemon's log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        Daemon {
            child,
            status: None,
            log,
            _dir: dir,
        }
    }

    /// Everything written so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the logs until they contain `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_for_count(|| self.logs(), needle, 1, timeout).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid on the daemon");
        }
        self.status
    }

    /// Sends `sig` unless the process has already been reaped.
    pub fn signal(&mut self, sig: i32) {
        if self.poll_exit().is_some() {
            return;
        }
        let pid = i32::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: plain syscall; the child is not reaped, so the pid is still ours.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
    }

    /// Waits up to `timeout` for the exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- daemon (pid {}) output -----\n{}----- end -----",
                self.child.id(),
                self.logs()
            );
        }
    }
}

/// How often `needle` occurs in `text`.
pub fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Polls `logs()` until `needle` occurs at least `n` times; returns whether it did in time.
pub async fn wait_for_count(
    logs: impl Fn() -> String,
    needle: &str,
    n: usize,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if count(&logs(), needle) >= n {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
