//! The proxy under test: the real `nitro-vsock-proxy` binary, listening on a `tcp:` stand-in for
//! vsock, with one fixed route to a loopback upstream; and what the bench reads of the process
//! (CPU time, resident memory, open descriptors) from `/proc`.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The `RUST_LOG` of the proxies started from now on (see [`set_log_level`]).
static LOG_LEVEL: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Proxies started after this call log at `level` (`warn`: no per-connection line; `info`: as
/// deployed, one line per connection). Their standard error goes to a file, as text, the way
/// an operator who does not use the journal keeps the lines.
pub fn set_log_level(level: &str) {
    *LOG_LEVEL.lock().unwrap_or_else(|e| e.into_inner()) = level.to_owned();
}

/// The level [`set_log_level`] set, `warn` before any call.
pub fn log_level() -> String {
    let level = LOG_LEVEL.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if level.is_empty() {
        "warn".to_owned()
    } else {
        level
    }
}

/// The proxy binary: this build's, or `BENCH_PROXY_BIN` (another build, to compare two in one
/// run: `BENCH_PROXY_BIN=/tmp/before make bench`).
pub fn proxy_binary() -> std::ffi::OsString {
    std::env::var_os("BENCH_PROXY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_nitro-vsock-proxy").into())
}

/// `proxy.log` in the proxy's own directory, for its standard error (the bench prints the
/// file's last lines when the proxy fails to start).
fn log_file(dir: &tempfile::TempDir) -> io::Result<std::fs::File> {
    std::fs::File::create(dir.path().join("proxy.log"))
}

/// Writes `dir`'s `allowlist.yaml` naming exactly `upstream` (AWS's format, which both proxies
/// read; loopback is denied unless an entry names the IP explicitly) and returns its path.
fn write_allowlist(
    dir: &tempfile::TempDir,
    upstream: SocketAddr,
) -> io::Result<std::path::PathBuf> {
    let config = dir.path().join("allowlist.yaml");
    std::fs::write(
        &config,
        format!(
            "allowlist:\n- {{address: {}, port: {}}}\n",
            upstream.ip(),
            upstream.port()
        ),
    )?;
    Ok(config)
}

/// The running proxy; killed when dropped, including while a panic unwinds.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts `nitro-vsock-proxy tcp:127.0.0.1:P <upstream ip> <upstream port>` with an allowlist
    /// naming exactly the upstream, and `extra` arguments; with `pin_cpu`, the whole process
    /// (every thread it starts) runs on that CPU only. Returns once it accepts connections.
    pub fn start(
        upstream: SocketAddr,
        pin_cpu: Option<usize>,
        extra: &[impl AsRef<std::ffi::OsStr>],
    ) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = write_allowlist(&dir, upstream)?;
        // A free port for the proxy to listen on (it could be taken in between; unlikely).
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let route = [
            format!("tcp:{addr}"),
            upstream.ip().to_string(),
            upstream.port().to_string(),
        ];
        Proxy::spawn(dir, addr, &route, &config, extra, pin_cpu)
    }

    /// Runs the proxy binary with `route` arguments, `--config config` and `extra`, at the
    /// bench's log level with its lines in `dir`'s `proxy.log`, pinned to `pin_cpu`; returns
    /// once it accepts connections on `addr`.
    fn spawn(
        dir: tempfile::TempDir,
        addr: SocketAddr,
        route: &[String],
        config: &std::path::Path,
        extra: &[impl AsRef<std::ffi::OsStr>],
        pin_cpu: Option<usize>,
    ) -> io::Result<Self> {
        let mut command = Command::new(proxy_binary());
        command
            .args(route)
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RUST_LOG", log_level())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir)?);
        pin(&mut command, pin_cpu);
        let child = command.spawn()?;
        Proxy::ready(Proxy {
            child,
            addr,
            _dir: dir,
        })
    }

    /// Starts the proxy with one `mode: ingress` route, `tcp:127.0.0.1:P` to `tcp:upstream`
    /// (the enclave's stand-in), admitting 127.0.0.0/8 and sending no PROXY header (the echo
    /// upstream would echo it), with `extra` arguments, pinned as [`Proxy::start`] is. Returns
    /// once it accepts connections.
    pub fn start_ingress(
        upstream: SocketAddr,
        pin_cpu: Option<usize>,
        extra: &[impl AsRef<std::ffi::OsStr>],
    ) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("routes.yaml");
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        std::fs::write(
            &config,
            format!(
                "routes:\n- {{listen: 'tcp:{addr}', mode: ingress, to: 'tcp:{upstream}', \
                 allow_from: ['127.0.0.0/8']}}\n"
            ),
        )?;
        Proxy::spawn(dir, addr, &[], &config, extra, pin_cpu)
    }

    /// Starts `socat TCP-LISTEN:P,fork,reuseaddr TCP:upstream`, the hop an ingress route
    /// replaces (one process per connection), pinned as [`Proxy::start`] is (its children
    /// inherit the CPU). `None` when socat is not installed.
    pub fn start_socat(upstream: SocketAddr, pin_cpu: Option<usize>) -> Option<io::Result<Self>> {
        let socat = ["/usr/bin/socat", "/bin/socat"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let started = (|| {
            let dir = tempfile::tempdir()?;
            let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut command = Command::new(socat);
            command
                .arg(format!(
                    "TCP-LISTEN:{},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                    addr.port()
                ))
                .arg(format!("TCP:{upstream}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            pin(&mut command, pin_cpu);
            let child = command.spawn()?;
            Proxy::ready(Proxy {
                child,
                addr,
                _dir: dir,
            })
        })();
        Some(started)
    }

    /// Starts AWS's `vsock-proxy` from `BENCH_AWS_PROXY` — a build whose listener was changed
    /// to loopback TCP (the port is its first argument), everything else AWS's — relaying to
    /// `upstream` with an allowlist naming it, `-w 64` workers (its default of 4 serves four
    /// connections at once), at the bench's log level, pinned as [`Proxy::start`] is. `None`
    /// without `BENCH_AWS_PROXY`.
    pub fn start_aws(upstream: SocketAddr, pin_cpu: Option<usize>) -> Option<io::Result<Self>> {
        let binary = std::env::var_os("BENCH_AWS_PROXY").filter(|p| !p.is_empty())?;
        let started = (|| {
            let dir = tempfile::tempdir()?;
            let config = write_allowlist(&dir, upstream)?;
            let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut command = Command::new(&binary);
            command
                .args(["-w", "64"])
                .arg(addr.port().to_string())
                .arg(upstream.ip().to_string())
                .arg(upstream.port().to_string())
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", log_level())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&dir)?);
            pin(&mut command, pin_cpu);
            let child = command.spawn()?;
            Proxy::ready(Proxy {
                child,
                addr,
                _dir: dir,
            })
        })();
        Some(started)
    }

    /// Waits until `proxy` accepts connections, or says why it did not.
    fn ready(mut proxy: Proxy) -> io::Result<Proxy> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                let log = std::fs::read_to_string(proxy._dir.path().join("proxy.log"))
                    .unwrap_or_default();
                return Err(io::Error::other(format!(
                    "it exited at start-up ({status}); its messages:\n{log}"
                )));
            }
            if TcpStream::connect_timeout(&proxy.addr, Duration::from_millis(200)).is_ok() {
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "nothing accepted connections on {} within {START_TIMEOUT:?}",
                    proxy.addr
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The proxy's user + system CPU time so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // The command name (field 2) may contain spaces; the fields after its ')' are fixed.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); utime is field 14, stime field 15.
        let field = |n: usize| -> u64 {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("{path}: no field {n} in {stat:?}"))
        };
        field(14) + field(15)
    }

    /// The proxy's resident set (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{path}: no VmRSS line in {status:?}"))
    }

    /// How many descriptors the proxy holds open now.
    pub fn open_descriptors(&self) -> usize {
        let path = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `pin_cpu`, `command`'s process (and every thread and child it starts) runs on that CPU
/// only.
fn pin(command: &mut Command, pin_cpu: Option<usize>) {
    if let Some(cpu) = pin_cpu {
        // SAFETY: between fork and exec only sched_setaffinity(2), which is async-signal-safe,
        // runs, on a set built before the fork.
        let set = cpu_set(cpu);
        unsafe {
            command.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(io::Error::other(format!(
                        "sched_setaffinity: {}",
                        io::Error::last_os_error()
                    )));
                }
                Ok(())
            });
        }
    }
}

/// Clock ticks every CPU of the machine has spent busy so far (the `cpu` line of `/proc/stat`:
/// everything but idle and iowait), by every process and the kernel's interrupt work.
pub fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_else(|e| panic!("/proc/stat: {e}"));
    let total = stat
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .unwrap_or_else(|| panic!("/proc/stat: no `cpu ` line"));
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    total
        .split_whitespace()
        .take(8)
        .enumerate()
        .filter(|(field, _)| !matches!(field, 3 | 4))
        .map(|(_, ticks)| ticks.parse::<u64>().unwrap_or(0))
        .sum()
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks > 0, "sysconf(_SC_CLK_TCK) failed");
    ticks as f64
}

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (the bench only pins to CPU 0).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Runs the calling thread on `cpu` only.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises this process's soft open-file limit to its hard limit; returns the limit in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}
