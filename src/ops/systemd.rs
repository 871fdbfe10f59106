//! The systemd service protocol, behind one small module: readiness, status and watchdog
//! notifications (`sd_notify`), socket activation (`sd_listen_fds`) and whether standard error is
//! the journal (`JOURNAL_STREAM`).
//!
//! Outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`, no `JOURNAL_STREAM`) everything here is a
//! no-op, so the daemon behaves the same from a shell.
//!
//! Notifications and socket activation go through the `systemd` crate (libsystemd's
//! `sd_pid_notify_with_fds`, `sd_watchdog_enabled`, `sd_listen_fds`), with these choices:
//! - The environment is left as it is (the crate's safe functions): the daemon starts no child
//!   process that could inherit `NOTIFY_SOCKET` or `LISTEN_FDS`, and unsetting variables while
//!   runtime threads may read the environment would be a data race.
//! - libsystemd hands out socket-activation descriptors as plain numbers that nobody owns;
//!   [`take_listen_fds`] turns them into [`OwnedFd`]s exactly once per process, so they are closed
//!   when the listener built from them is dropped and can never be owned twice.
//! - A failed notification is not fatal (systemd may be gone during shutdown); the first failure
//!   is logged at WARN, later ones at DEBUG, so a broken `NOTIFY_SOCKET` cannot flood the log.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backend as daemon;

/// libsystemd, through the `systemd` crate (the default `systemd` cargo feature).
#[cfg(feature = "systemd")]
mod backend {
    use std::os::fd::RawFd;

    pub fn watchdog_enabled() -> Result<u64, String> {
        ::systemd::daemon::watchdog_enabled().map_err(|e| e.to_string())
    }

    pub fn notify<'a>(pairs: impl Iterator<Item = &'a (&'a str, String)>) -> Result<(), String> {
        ::systemd::daemon::notify(pairs)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub fn listen_fds() -> Result<Vec<RawFd>, String> {
        ::systemd::daemon::listen_fds()
            .map(|fds| fds.iter().collect())
            .map_err(|e| e.to_string())
    }
}

/// A build without libsystemd (`--no-default-features`: static binaries for the VM tests,
/// library users such as enclave-app): nothing is ever sent, and a socket passed by systemd is
/// an error that says why rather than a socket silently ignored.
#[cfg(not(feature = "systemd"))]
mod backend {
    use std::os::fd::RawFd;

    const NO_SYSTEMD: &str = "this build of nitro-vsock-proxy has no systemd support \
                              (built without the `systemd` cargo feature)";

    pub fn watchdog_enabled() -> Result<u64, String> {
        Ok(0)
    }

    pub fn notify<'a>(_pairs: impl Iterator<Item = &'a (&'a str, String)>) -> Result<(), String> {
        Err(NO_SYSTEMD.into())
    }

    pub fn listen_fds() -> Result<Vec<RawFd>, String> {
        match std::env::var_os("LISTEN_FDS") {
            Some(_) => Err(NO_SYSTEMD.into()),
            None => Ok(Vec::new()),
        }
    }
}

/// Sends state changes to the service manager, if there is one (`NOTIFY_SOCKET` is set).
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    warned: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` (ignored unless meant for this
    /// process). A malformed `WATCHDOG_USEC` disables the watchdog with a warning.
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        let watchdog = match daemon::watchdog_enabled() {
            Ok(0) => None,
            Ok(usec) if enabled => Some(Duration::from_micros(usec)),
            Ok(_) => {
                tracing::warn!(
                    "WATCHDOG_USEC is set but NOTIFY_SOCKET is not: no watchdog pings can be sent"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    "ignoring the watchdog: WATCHDOG_USEC/WATCHDOG_PID are invalid ({e}); \
                     set WatchdogSec= in the unit rather than the variables by hand"
                );
                None
            }
        };
        Notifier {
            enabled,
            watchdog,
            warned: AtomicBool::new(false),
        }
    }

    /// A notifier that sends nothing (for library users and tests).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
            warned: AtomicBool::new(false),
        }
    }

    /// Whether a service manager listens (so status text is worth formatting).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Start-up (or a reload) is complete: the configuration is loaded and the listener bound.
    pub fn ready(&self, status: &str) {
        self.send(&[("READY", "1"), ("STATUS", status)]);
    }

    /// A configuration reload starts; `ready` ends it.
    pub fn reloading(&self) {
        let now = monotonic_usec();
        self.send(&[("RELOADING", "1"), ("MONOTONIC_USEC", &now)]);
    }

    /// The daemon is stopping (draining open connections).
    pub fn stopping(&self, status: &str) {
        self.send(&[("STOPPING", "1"), ("STATUS", status)]);
    }

    /// A one-line status for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&[("STATUS", status)]);
    }

    /// The watchdog keep-alive ping.
    pub fn watchdog(&self) {
        self.send(&[("WATCHDOG", "1")]);
    }

    fn send(&self, pairs: &[(&str, &str)]) {
        if !self.enabled {
            return;
        }
        // A NUL would make the crate panic, a newline would start a new assignment: neither
        // belongs in a value.
        let clean: Vec<(&str, String)> = pairs
            .iter()
            .map(|(k, v)| (*k, v.replace(['\0', '\n'], " ")))
            .collect();
        match daemon::notify(clean.iter()) {
            Ok(()) => {}
            Err(e) => {
                let keys: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
                if self.warned.swap(true, Ordering::Relaxed) {
                    tracing::debug!(keys = ?keys, "cannot notify the service manager: {e}");
                } else {
                    tracing::warn!(
                        keys = ?keys,
                        notify_socket = ?std::env::var_os("NOTIFY_SOCKET"),
                        "cannot notify the service manager through NOTIFY_SOCKET: {e} \
                         (further failures are logged at debug level)"
                    );
                }
            }
        }
    }
}

fn monotonic_usec() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own and pass by valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return "0".into();
    }
    let usec = (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1000);
    usec.to_string()
}

static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// The sockets passed by socket activation (`LISTEN_FDS` for this process's `LISTEN_PID`), as
/// owned descriptors, in order (fd 3, 4, ...). Empty without socket activation, and on every call
/// after the first (the descriptors have an owner by then).
pub fn take_listen_fds() -> Result<Vec<OwnedFd>, String> {
    if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let fds = daemon::listen_fds().map_err(|e| {
        format!(
            "cannot use the sockets passed by systemd (LISTEN_FDS={:?}, LISTEN_PID={:?}): {e}; \
             check the .socket unit, or unset LISTEN_FDS to let the proxy bind LISTEN itself",
            std::env::var_os("LISTEN_FDS"),
            std::env::var_os("LISTEN_PID"),
        )
    })?;
    Ok(fds
        .into_iter()
        // SAFETY: sd_listen_fds checked that LISTEN_PID is this process, so descriptors
        // 3..3+LISTEN_FDS were passed to it for this purpose and nothing else in the process owns
        // them; LISTEN_FDS_TAKEN makes this the only place that ever takes them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// Whether standard error is connected to the journal: systemd sets `JOURNAL_STREAM=DEV:INODE`
/// for a service whose stdout/stderr go to journald, and stderr is that very stream only if its
/// device and inode match (a child that redirected stderr inherits the variable, but not the
/// match). See systemd.exec(5).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes into the zeroed stat buffer we own; fd 2 is only inspected.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(libc::STDERR_FILENO, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}
