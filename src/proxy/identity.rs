//! Which enclave runs at a CID: `--enclaves-command`'s table of the running enclaves, kept
//! current for the per-enclave policy ([`crate::policy::enclaves`]).
//!
//! This module owns running the command (split on whitespace, no shell, stdout read up to
//! [`MAX_OUTPUT`], killed after [`COMMAND_TIMEOUT`]; a child process, so no async worker ever
//! blocks on it), the table it gives (replaced whole; unavailable after a failure, so that
//! name/PCR/debug matches fail closed), its counter
//! (`nitro_vsock_proxy_enclaves_command_runs_total{result}`) and its log lines (one per change
//! of state, not per run). It runs only when some `enclaves:` entry matches by a key the table
//! gives ([`Identity::set_needed`]): at start-up, for a connection from a CID the table does
//! not list (at most once a [`LOOKUP_INTERVAL`], the connection waiting for it), and every
//! `--enclaves-refresh` ([`Identity::refresh`], whose caller revokes what a change takes away).

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tracing::{error, info};

use crate::policy::enclaves::{parse_describe, PeerIdentity, Table};
use crate::proxy::current::Current;

/// How long the command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of its standard output read (nitro-cli prints about 1 KiB per enclave).
pub const MAX_OUTPUT: u64 = 1024 * 1024;
/// A connection from an unlisted CID runs the command at most this often.
pub const LOOKUP_INTERVAL: Duration = Duration::from_secs(1);

/// How one run ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Run {
    #[error("listed {0} running enclaves")]
    Ok(usize),
    /// Could not start, or exited non-zero: why.
    #[error("failed: {0}")]
    Failed(String),
    #[error("did not finish within 5s and was killed")]
    Timeout,
    /// Printed something that is not describe-enclaves' JSON: why.
    #[error("printed something else than describe-enclaves' JSON: {0}")]
    Invalid(String),
}

impl Run {
    /// The counter's `result` label.
    pub fn label(&self) -> &'static str {
        match self {
            Run::Ok(_) => "ok",
            Run::Failed(_) => "failed",
            Run::Timeout => "timeout",
            Run::Invalid(_) => "invalid",
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Identity {
    command: Vec<String>,
    table: Current<Table>,
    needed: AtomicBool,
    /// One run at a time; holds when the last one started.
    running: tokio::sync::Mutex<Option<Instant>>,
    /// The last run's result label, to log only changes.
    last: Mutex<Option<&'static str>>,
}

impl Identity {
    /// `command` as given to `--enclaves-command`.
    pub fn new(command: &str) -> Identity {
        Identity {
            command: command.split_whitespace().map(str::to_owned).collect(),
            table: Current::new(Table::unavailable()),
            needed: AtomicBool::new(false),
            running: tokio::sync::Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    /// Whether some entry matches by name, PCR or debug (set at start-up and on reload); the
    /// command runs only then.
    pub fn set_needed(&self, needed: bool) {
        if needed {
            crate::ops::metrics::global().enclaves_command_used();
        }
        self.needed.store(needed, Ordering::Relaxed);
    }

    pub fn needed(&self) -> bool {
        self.needed.load(Ordering::Relaxed)
    }

    /// The table as of now.
    pub fn table(&self) -> Arc<Table> {
        self.table.get()
    }

    /// The table for a connection from `peer`: for a CID the table does not list, the command
    /// is run first (unless it ran within [`LOOKUP_INTERVAL`], or another connection's run is
    /// under way, which this one waits for).
    pub async fn table_for(&self, peer: &PeerIdentity) -> Arc<Table> {
        let table = self.table();
        let Some(cid) = peer.cid else {
            return table;
        };
        if !self.needed() || table.lists(cid) {
            return table;
        }
        let mut last = self.running.lock().await;
        let table = self.table();
        if table.lists(cid) || last.is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL) {
            return table;
        }
        *last = Some(Instant::now());
        self.run_locked().await;
        self.table()
    }

    /// Runs the command once, counted and logged as any run (`--check-config`).
    pub async fn run_once(&self) -> Run {
        let run = self.run_command().await;
        crate::ops::metrics::global().enclaves_command_run(run.label());
        run
    }

    /// Runs the command now (the periodic refresh); returns whether the table changed.
    pub async fn refresh(&self) -> bool {
        if !self.needed() {
            return false;
        }
        let mut last = self.running.lock().await;
        *last = Some(Instant::now());
        let before = self.table();
        self.run_locked().await;
        *self.table() != *before
    }

    async fn run_locked(&self) {
        let run = self.run_command().await;
        crate::ops::metrics::global().enclaves_command_run(run.label());
        self.log_change(&run);
        if let Run::Ok(_) = run {
            return;
        }
        // Fail closed: matches by name, PCR and debug need a table the command just gave.
        self.table.set(Table::unavailable());
    }

    /// Logs a run whose result differs from the last one's.
    fn log_change(&self, run: &Run) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == Some(run.label()) {
            return;
        }
        *last = Some(run.label());
        let command = self.command.join(" ");
        match run {
            Run::Ok(n) => info!(
                command = %command,
                "--enclaves-command lists {n} running enclave{}; `enclaves:` entries match by name, PCR and debug",
                if *n == 1 { "" } else { "s" }
            ),
            Run::Failed(why) => error!(
                command = %command,
                "--enclaves-command failed: {why}; until it works, `enclaves:` entries match only by cid and source (name, pcr and debug fail closed). Check that the daemon may run it (nitro-cli needs the ne group)"
            ),
            Run::Timeout => error!(
                command = %command,
                "--enclaves-command did not finish within {}s and was killed; until it works, `enclaves:` entries match only by cid and source",
                COMMAND_TIMEOUT.as_secs()
            ),
            Run::Invalid(why) => error!(
                command = %command,
                "--enclaves-command printed something else than `nitro-cli describe-enclaves --metadata` JSON: {why}; until it does, `enclaves:` entries match only by cid and source"
            ),
        }
    }

    /// Runs the command once and, on success, makes its table current.
    async fn run_command(&self) -> Run {
        let Some((program, args)) = self.command.split_first() else {
            return Run::Failed("the command is empty".into());
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, output(program, args)).await {
            Err(_) => Run::Timeout,
            Ok(Err(why)) => Run::Failed(why),
            Ok(Ok(text)) => match parse_describe(&text) {
                Ok(running) => {
                    let n = running.len();
                    self.table.set(Table::known(running));
                    Run::Ok(n)
                }
                Err(why) => Run::Invalid(why),
            },
        }
    }
}

/// The command's standard output (at most [`MAX_OUTPUT`] bytes), if it exits 0. The child is
/// killed when this future is dropped (the timeout).
async fn output(program: &str, args: &[String]) -> Result<String, String> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let read_out = async {
        if let Some(out) = out {
            let _ = out.take(MAX_OUTPUT + 1).read_to_end(&mut stdout).await;
        }
    };
    let read_err = async {
        if let Some(err) = err {
            let _ = err.take(4096).read_to_end(&mut stderr).await;
        }
    };
    tokio::join!(read_out, read_err);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("cannot wait for {program}: {e}"))?;
    if stdout.len() as u64 > MAX_OUTPUT {
        return Err(format!("{program} printed more than {MAX_OUTPUT} bytes"));
    }
    if !status.success() {
        let said = String::from_utf8_lossy(&stderr);
        let said = said.trim();
        return Err(if said.is_empty() {
            format!("{program} exited with {status}")
        } else {
            format!("{program} exited with {status}: {said}")
        });
    }
    String::from_utf8(stdout).map_err(|_| format!("{program} printed bytes that are not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_hanging_or_garbled_command_leaves_no_table() {
        let ok = Identity::new("echo [{\"EnclaveName\":\"a\",\"EnclaveCID\":16,\"State\":\"RUNNING\",\"Flags\":\"NONE\"}]");
        ok.set_needed(true);
        assert!(ok.refresh().await);
        assert!(ok.table().lists(16));
        for (command, label) in [
            ("false", "failed"),
            ("/nonexistent/nitro-cli", "failed"),
            ("echo not json", "invalid"),
        ] {
            let id = Identity::new(command);
            id.set_needed(true);
            assert_eq!(id.run_command().await.label(), label, "{command}");
            assert!(!id.table().is_available(), "{command}");
        }
    }
}
