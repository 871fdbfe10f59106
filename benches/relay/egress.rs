//! The transparent-egress figures of `make bench` (issue 21): an unmodified client in an
//! "enclave" network namespace (only `lo`, `enclave-app/egress.nft`, the address and routes
//! `enclave-app egress --print-setup` prints, resolv.conf naming the stub) reaching the sink and
//! the echo server by name through `enclave-app egress` and the real daemon's dns and connect
//! routes, against a direct loopback connection, in the same run:
//!
//! * 1-stream download GiB/s (the sink's download through the whole chain: redirect, egress,
//!   `unix:` stand-ins for vsock, the daemon, loopback to the sink);
//! * connection set-up p50: a DNS question to the stub (which asks the parent), the connect and
//!   a 1-byte echo, against a direct connect and the same echo.
//!
//! The daemon runs in this process's network namespace with a private `/etc/hosts` (an
//! `unshare -m` of its own) naming the two servers, and allowlists them by name and by their
//! loopback address (the daemon connects to loopback only when an IP entry names it). Its
//! connect route has no `sni: require`: the bench moves raw bytes, not TLS. Needs root (network
//! and mount namespaces, nft) and the enclave-app binary next to the daemon's (`make bench`
//! builds it; `cargo test --workspace` does too).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::throughput::{self, Direction, GIB};
use crate::{paths, Path as Route};

const SINK_NAME: &str = "sink.egress.bench";
const ECHO_NAME: &str = "echo.egress.bench";
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What the egress rows show.
pub struct Figures {
    pub direct_gibps: f64,
    pub egress_gibps: f64,
    pub direct_setup_us: f64,
    pub egress_setup_us: f64,
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Measures both figures; `bytes` per transfer, `rounds` rounds, `setups` set-ups per path.
pub fn measure(
    sink: SocketAddr,
    echo: SocketAddr,
    bytes: u64,
    rounds: usize,
    setups: usize,
    pattern: &Arc<Vec<u8>>,
) -> Figures {
    let proxy_bin = PathBuf::from(env!("CARGO_BIN_EXE_nitro-vsock-proxy"));
    let app = proxy_bin.with_file_name("enclave-app");
    assert!(
        app.exists(),
        "{} is missing: build it with `cargo build -p enclave-app` (`--release` for cargo bench; \
         make bench does)",
        app.display()
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let _daemon = start_daemon(dir.path(), &proxy_bin, sink, echo);
    let enclave = Enclave::start(dir.path(), &app);

    let sink_ip = enclave
        .run(|| resolve(SINK_NAME))
        .expect("the stub answers the sink's name");
    let via_egress = SocketAddr::from((sink_ip, sink.port()));
    for dir in [Direction::Upload, Direction::Download] {
        let pattern = Arc::clone(pattern);
        enclave
            .run(move || {
                throughput::transfer(via_egress, dir, throughput::VERIFY_BYTES, &pattern, true)
            })
            .unwrap_or_else(|e| panic!("integrity check through egress, {}: {e}", dir.name()));
    }
    println!(
        "egress integrity check (SHA-256, {} bytes each way): OK",
        throughput::VERIFY_BYTES
    );

    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for path in paths(round) {
            let pattern = Arc::clone(pattern);
            let seconds = match path {
                Route::Direct => {
                    throughput::transfer(sink, Direction::Download, bytes, &pattern, false)
                }
                Route::Proxy => enclave.run(move || {
                    throughput::transfer(via_egress, Direction::Download, bytes, &pattern, false)
                }),
            }
            .unwrap_or_else(|e| panic!("egress bench, download round {}: {e}", round + 1));
            rates[path as usize].push(bytes as f64 / GIB / seconds);
        }
    }

    let echo_port = echo.port();
    let mut setup = [Vec::new(), Vec::new()];
    for i in 0..setups {
        for path in paths(i) {
            let micros = match path {
                Route::Direct => set_up(|| Ok(echo)),
                Route::Proxy => enclave
                    .run(move || set_up(|| Ok(SocketAddr::from((resolve(ECHO_NAME)?, echo_port))))),
            }
            .unwrap_or_else(|e| panic!("egress bench, set-up {}: {e}", i + 1));
            setup[path as usize].push(micros);
        }
    }
    Figures {
        direct_gibps: throughput::median(&rates[Route::Direct as usize]),
        egress_gibps: throughput::median(&rates[Route::Proxy as usize]),
        direct_setup_us: throughput::median(&setup[Route::Direct as usize]),
        egress_setup_us: throughput::median(&setup[Route::Proxy as usize]),
    }
}

/// One connection set-up in µs: where to connect (a DNS question, for egress), the connect, and
/// a 1-byte echo (through egress the connect completes at the redirect; the byte's return means
/// the parent connected).
fn set_up(address: impl FnOnce() -> io::Result<SocketAddr>) -> io::Result<f64> {
    let started = Instant::now();
    let addr = address()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"x")?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte)?;
    Ok(started.elapsed().as_secs_f64() * 1e6)
}

/// `name`'s A record from the stub on 127.0.0.1:53 (one UDP question, as a resolver asks).
fn resolve(name: &str) -> io::Result<Ipv4Addr> {
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    udp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut query = Message::new(0x4242, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    let name = Name::from_ascii(name).map_err(io::Error::other)?;
    query.add_query(Query::query(name, RecordType::A));
    udp.send_to(&query.to_vec().map_err(io::Error::other)?, "127.0.0.1:53")?;
    let mut buf = [0u8; 1500];
    let n = udp.recv(&mut buf)?;
    let answer = Message::from_vec(&buf[..n]).map_err(io::Error::other)?;
    answer
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .ok_or_else(|| io::Error::other(format!("no address from the stub: {answer:?}")))
}

/// The daemon with a dns and a connect route on unix sockets in `dir`, and a private
/// `/etc/hosts` naming the two servers; returns once both routes listen.
fn start_daemon(dir: &Path, proxy_bin: &Path, sink: SocketAddr, echo: SocketAddr) -> Killed {
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n127.0.0.1 {SINK_NAME} {ECHO_NAME}\n"),
    )
    .expect("write the daemon's hosts file");
    let (connect, dns) = (dir.join("connect.sock"), dir.join("dns.sock"));
    let config = dir.join("routes.yaml");
    std::fs::write(
        &config,
        format!(
            "allowlist:\n\
             - {{address: {SINK_NAME}, port: {sp}}}\n\
             - {{address: {ECHO_NAME}, port: {ep}}}\n\
             - {{address: 127.0.0.1, port: {sp}}}\n\
             - {{address: 127.0.0.1, port: {ep}}}\n\
             routes:\n\
             - {{listen: 'unix:{c}', mode: connect}}\n\
             - {{listen: 'unix:{d}', mode: dns}}\n",
            sp = sink.port(),
            ep = echo.port(),
            c = connect.display(),
            d = dns.display(),
        ),
    )
    .expect("write the daemon's configuration");
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" /etc/hosts && exec \"$2\" --config \"$3\"")
        .arg("sh")
        .args([hosts.as_os_str(), proxy_bin.as_os_str(), config.as_os_str()])
        .env("RUST_LOG", crate::proxy::log_level())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the daemon under unshare -m (util-linux; needs root)");
    let daemon = Killed(child);
    wait_for("the daemon's routes", || connect.exists() && dns.exists());
    daemon
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what}: not ready after {START_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread in the enclave's network and mount namespaces, running jobs; the threads it starts
/// (a transfer's) are in them too. `enclave-app egress` runs there until this is dropped.
struct Enclave {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Enclave {
    fn start(dir: &Path, app: &Path) -> Enclave {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel::<()>();
        let (dir, app) = (dir.to_path_buf(), app.to_path_buf());
        let thread = thread::spawn(move || {
            let _egress = enter(&dir, &app);
            let _ = ready_tx.send(());
            for job in queue {
                job();
            }
        });
        ready
            .recv()
            .expect("the enclave could not be set up; its error is above");
        Enclave {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("the enclave is running")
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("the enclave thread has ended");
        rx.recv()
            .expect("an enclave job panicked; its message is above")
    }
}

impl Drop for Enclave {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves this thread into new network and mount namespaces and sets them up as an enclave
/// image would; returns `enclave-app egress`, listening.
fn enter(dir: &Path, app: &Path) -> Killed {
    use std::ffi::CString;
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").expect("write the enclave's resolv.conf");
    let c = |s: &Path| CString::new(s.as_os_str().as_encoded_bytes()).expect("no NUL in paths");
    // SAFETY: unshare and mount change only this thread's namespaces and mounts; the strings
    // outlive the calls.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS),
            0,
            "unshare(CLONE_NEWNET | CLONE_NEWNS) for the egress bench (needs root): {}",
            io::Error::last_os_error()
        );
        let root = c(Path::new("/"));
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0,
            "make / private: {}",
            io::Error::last_os_error()
        );
        let (source, target) = (c(&resolv), c(Path::new("/etc/resolv.conf")));
        assert_eq!(
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null()
            ),
            0,
            "bind-mount the enclave's resolv.conf: {}",
            io::Error::last_os_error()
        );
    }
    let nft = Path::new(env!("CARGO_MANIFEST_DIR")).join("enclave-app/egress.nft");
    let must = |program: &str, args: &[&str]| {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    must("ip", &["link", "set", "lo", "up"]);
    must("nft", &["-f", &nft.display().to_string()]);
    let app_path = app.display().to_string();
    let setup = must(&app_path, &["egress", "--print-setup"]);
    for line in setup
        .lines()
        .filter(|l| l.starts_with("ip route ") || l.starts_with("ip address "))
    {
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        must("ip", &args);
    }
    let child = Command::new(app)
        .args(["egress", "--parent-dns"])
        .arg(format!("unix:{}", dir.join("dns.sock").display()))
        .arg("--connect-via")
        .arg(format!("unix:{}", dir.join("connect.sock").display()))
        .env("RUST_LOG", crate::proxy::log_level())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start enclave-app egress");
    let egress = Killed(child);
    // 127.0.0.1:15001 listening (state 0A), read from this thread's namespace's table.
    wait_for("enclave-app egress", || {
        std::fs::read_to_string("/proc/thread-self/net/tcp").is_ok_and(|t| {
            t.lines()
                .any(|l| l.contains("0100007F:3A99") && l.split_whitespace().nth(3) == Some("0A"))
        })
    });
    egress
}
