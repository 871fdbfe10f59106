//! Logging never holds up traffic, through the real binary: the daemon logs at debug level into
//! a pipe that nobody reads (its standard error stalls once the pipe is full), and still serves
//! thousands of short connections and a bulk transfer with every byte intact; once the pipe is
//! read again, the daemon says how many log lines it dropped. Runs in its own network namespace.

mod common;

use std::io::Read;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, is_listening, PROXY_BIN};
use common::upstream::echo_server;
use common::wait_until;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

const LISTEN: &str = "tcp:127.0.0.1:8001";
const UPSTREAM: &str = "192.0.2.10:443";
const WAIT: Duration = Duration::from_secs(30);
/// Each connection logs a few lines at debug level: together far more than the pipe (64 KiB)
/// and the daemon's queue (8192 lines) hold, so lines must be dropped.
const CONNECTIONS: usize = 4000;
const CONCURRENT: usize = 32;
const BULK_BYTES: usize = 16 * 1024 * 1024;
/// The drop warning, after its count ("1 log line dropped: ...", "N log lines dropped: ...").
const DROPPED_WARNING: &str = "dropped: standard error was not keeping up";

/// The daemon, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes waiting in the pipe (FIONREAD) and the pipe's capacity (F_GETPIPE_SZ).
fn pipe_fill(reader: &std::io::PipeReader) -> (usize, usize) {
    let fd = reader.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `queued`; F_GETPIPE_SZ only reads the descriptor.
    let (rc, capacity) = unsafe {
        (
            libc::ioctl(fd, libc::FIONREAD, &mut queued),
            libc::fcntl(fd, libc::F_GETPIPE_SZ),
        )
    };
    assert!(
        rc == 0 && capacity > 0,
        "cannot inspect the stderr pipe: {}",
        std::io::Error::last_os_error()
    );
    (queued as usize, capacity as usize)
}

/// Where the daemon's `log-stderr` thread sleeps in the kernel (`/proc/PID/task/TID/wchan`,
/// e.g. `anon_pipe_write` or `pipe_write` while a write into a full pipe waits).
fn log_writer_wait_channel(pid: u32) -> String {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "log-stderr" {
            return std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
        }
    }
    panic!("the daemon {pid} has no log-stderr thread");
}

/// One short connection: a unique message, half-close, the echo until EOF.
async fn echo_one(i: usize) -> Result<(), String> {
    let msg = format!("connection {i} says hello");
    let mut conn = connect(LISTEN).await;
    let reply = conn
        .round_trip(msg.as_bytes(), WAIT)
        .await
        .map_err(|e| format!("connection {i}: {e}"))?;
    if reply != msg.as_bytes() {
        return Err(format!(
            "connection {i}: got {:?}",
            String::from_utf8_lossy(&reply)
        ));
    }
    Ok(())
}

/// Writes [`BULK_BYTES`] of pseudo-random data and reads the echo at the same time; both
/// SHA-256 digests must match.
async fn bulk_echo() -> Result<(), String> {
    let conn = connect(LISTEN).await;
    let (mut rd, mut wr) = tokio::io::split(conn);
    let writer = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < BULK_BYTES {
            for b in chunk.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            wr.write_all(&chunk).await?;
            hash.update(&chunk);
            sent += chunk.len();
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(hash.finalize())
    });
    let mut hash = Sha256::new();
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(WAIT, async {
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            hash.update(&buf[..n]);
            received += n;
        }
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("bulk read: {e}")),
        Err(_) => return Err(format!("bulk read timed out after {received} bytes")),
    }
    let sent = writer
        .await
        .map_err(|e| format!("bulk writer: {e}"))?
        .map_err(|e| format!("bulk write: {e}"))?;
    if received != BULK_BYTES || hash.finalize() != sent {
        return Err(format!(
            "bulk: {received} of {BULK_BYTES} bytes back, digests equal: false"
        ));
    }
    Ok(())
}

#[test]
fn a_stalled_stderr_drops_log_lines_but_not_traffic() {
    run_in_netns(|| async {
        add_lo_addr("192.0.2.10".parse::<IpAddr>().unwrap());
        let _upstream = echo_server(UPSTREAM.parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);

        // Standard error is a pipe the test does not read until the end.
        let (mut stderr_reader, stderr_writer) = std::io::pipe().expect("cannot create a pipe");
        let child = Command::new(PROXY_BIN)
            .args([LISTEN, "192.0.2.10", "443", "--config", &config])
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_writer)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {PROXY_BIN}: {e}"));
        let mut daemon = Daemon(child);
        assert!(
            wait_until(WAIT, || is_listening(LISTEN)).await,
            "the proxy is not listening on {LISTEN}"
        );

        // Thousands of short connections, a few at a time, and one bulk transfer beside them.
        let bulk = tokio::spawn(bulk_echo());
        let mut failures = Vec::new();
        let mut running = JoinSet::new();
        for i in 0..CONNECTIONS {
            if running.len() >= CONCURRENT {
                if let Some(Ok(Err(e))) = running.join_next().await {
                    failures.push(e);
                }
            }
            // A stuck daemon would time every connection out: stop at the first failure.
            if !failures.is_empty() {
                break;
            }
            running.spawn(echo_one(i));
        }
        while let Some(done) = running.join_next().await {
            if let Ok(Err(e)) = done {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} connections failed (the rest were not tried), e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        bulk.await.unwrap().unwrap_or_else(|e| panic!("{e}"));

        // The stall was real: the daemon's log writer thread is blocked writing into the full
        // pipe (it writes a batch at a time, so the pipe may hold a little less than its
        // capacity while the rest of the batch waits for room).
        let (queued, capacity) = pipe_fill(&stderr_reader);
        let writer = log_writer_wait_channel(daemon.0.id());
        assert!(
            writer.contains("pipe_write"),
            "the daemon's log-stderr thread waits in {writer:?}, not in a pipe write (the pipe \
             holds {queued} of {capacity} bytes): standard error never stalled, so this test \
             proved nothing"
        );

        // Read standard error again: the daemon catches up and says what it dropped.
        let text = Arc::new(Mutex::new(String::new()));
        std::thread::spawn({
            let text = text.clone();
            move || {
                let mut buf = [0u8; 64 * 1024];
                while let Ok(n) = stderr_reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    text.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let warned = wait_until(WAIT, || text.lock().unwrap().contains(DROPPED_WARNING)).await;
        let logs = text.lock().unwrap().clone();
        assert!(warned, "no {DROPPED_WARNING:?} within {WAIT:?}");
        let warning = logs.lines().find(|l| l.contains(DROPPED_WARNING)).unwrap();
        assert!(warning.contains(" WARN "), "{warning}");
        let dropped: u64 = warning
            .split(" WARN ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {warning:?}"));
        assert!(dropped > 0, "{warning}");
        eprintln!("the daemon reported: {warning}");

        // And it still stops cleanly.
        // SAFETY: plain kill(2) on our own, not yet reaped child.
        let rc = unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let exited = wait_until(WAIT, || matches!(daemon.0.try_wait(), Ok(Some(_)))).await;
        assert!(exited, "the proxy did not exit after SIGTERM");
        let status = daemon.0.wait().unwrap();
        assert_eq!(status.code(), Some(0));
    });
}
