//! Per-test private network namespaces.
//!
//! Owns the isolation every integration test starts with: [`run_in_netns`] moves the
//! calling thread into a fresh network namespace (its own `lo`, no other interfaces)
//! and runs an async test body on a tokio runtime whose worker threads are created
//! *after* the move, so they inherit it. Each test therefore has its own loopback and
//! can use fixed addresses/ports (`127.0.0.1:53`, `192.0.2.10:443`, ...) without
//! colliding with tests running concurrently or with the host.
//!
//! Namespaces are per *thread* on Linux: only the calling thread, and threads and
//! child processes created from it afterwards, are inside. Threads that already
//! existed (the libtest main thread, other tests) are not affected.
//!
//! Also owns side-effect-free socket-state checks for the current namespace, read from
//! `/proc/thread-self/net/*` ([`tcp_listening`], [`udp_bound`], [`unix_listening`]).
//!
//! Caveat for test authors: the fd table is per *process*. While any test thread
//! forks (spawning the proxy, `ip`, ...), the child holds a copy of every open fd until
//! it `exec`s, so a socket another test just closed can stay open for a few
//! milliseconds. Assert "port closed / connection refused" by polling (see
//! [`super::wait_until`]), never once right after a close.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

/// Message used when the namespace cannot be created; tests cannot run without it.
const NEED_ROOT: &str = "integration tests need root (CAP_SYS_ADMIN) to create a private \
                         network namespace: run `make test` as root";

/// Moves the current thread into a new, private network namespace and brings `lo` up
/// (127.0.0.1 and ::1 become usable).
///
/// Threads and child processes created afterwards from this thread inherit the
/// namespace (including the proxy binary spawned by `proxy::Proxy`).
///
/// # Panics
/// If `unshare(CLONE_NEWNET)` fails (typically: not root) or `lo` cannot be brought up.
pub fn enter_private_netns() {
    // SAFETY: unshare only changes the namespaces of the calling thread; no memory is shared.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        panic!("{NEED_ROOT} (unshare(CLONE_NEWNET) failed: {err})");
    }
    set_lo_up();
}

/// Brings `lo` up in the current thread's namespace, like `ip link set lo up` but with
/// an ioctl: no child process, so no `fork` that would briefly duplicate every open fd
/// of the test process (a concurrently running test's sockets) until `exec`.
fn set_lo_up() {
    // SAFETY: plain socket/ioctl/close syscalls on a zero-initialised, NUL-terminated
    // `ifreq` that lives for the duration of the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(
            fd >= 0,
            "socket() for bringing lo up failed: {}",
            io::Error::last_os_error()
        );
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut result = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if result == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            result = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        assert!(result == 0, "bringing lo up (SIOCSIFFLAGS) failed: {err}");
    }
}

/// Adds `ip` to `lo` in the current thread's namespace (`/32` for IPv4, `/128 nodad` for
/// IPv6, so the address is usable immediately without duplicate-address detection).
///
/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) adds its IPv4 address: connecting to
/// the mapped form is IPv4 traffic to `a.b.c.d`, which is what a listener must catch.
///
/// Call it after [`enter_private_netns`] (or inside [`run_in_netns`]); in the host
/// namespace it would add a real address to the machine's loopback.
pub fn add_lo_addr(ip: IpAddr) {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => run_ip(&["addr", "add", &format!("{v4}/32"), "dev", "lo"]),
        IpAddr::V6(v6) => run_ip(&["addr", "add", &format!("{v6}/128"), "dev", "lo", "nodad"]),
    }
}

/// Enters a private network namespace, then builds a multi-thread tokio runtime (its
/// worker threads are spawned from this thread after the `unshare`, so they are in the
/// namespace too) and blocks on the future returned by `f`.
///
/// `f` itself also runs on the calling thread after the `unshare`, so synchronous setup
/// in it is inside the namespace as well. The runtime is dropped (and every task it
/// still owns with it) when the future completes.
///
/// ```ignore
/// #[test]
/// fn my_test() {
///     common::run_in_netns(|| async {
///         let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
///         // ...
///     });
/// }
/// ```
pub fn run_in_netns<F: Future>(f: impl FnOnce() -> F) -> F::Output {
    enter_private_netns();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("netns-test-worker")
        .build()
        .expect("failed to build the tokio runtime for the test");
    let fut = f();
    runtime.block_on(fut)
}

/// Identifies the network namespace of the calling thread (e.g. `net:[4026532281]`),
/// read from `/proc/thread-self/ns/net`. Two threads are in the same namespace iff
/// their ids are equal.
pub fn current_netns_id() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .expect("cannot read /proc/thread-self/ns/net (is /proc mounted?)")
        .to_string_lossy()
        .into_owned()
}

/// Whether a TCP socket in the current thread's namespace listens on `addr` (read from
/// `/proc/thread-self/net/tcp{,6}`; no connection is made). A wildcard listener of the
/// same family (or `[::]`, which is dual-stack by default) on that port counts.
pub fn tcp_listening(addr: SocketAddr) -> bool {
    const TCP_LISTEN: &str = "0A";
    proc_sockets(&["tcp", "tcp6"], Some(TCP_LISTEN))
        .iter()
        .any(|local| covers(*local, addr))
}

/// Whether a UDP socket in the current thread's namespace is bound to `addr` (read from
/// `/proc/thread-self/net/udp{,6}`; wildcard binds count as for [`tcp_listening`]).
pub fn udp_bound(addr: SocketAddr) -> bool {
    proc_sockets(&["udp", "udp6"], None)
        .iter()
        .any(|local| covers(*local, addr))
}

/// Whether a Unix stream socket bound to `path` is listening in the current thread's
/// namespace (read from `/proc/thread-self/net/unix`; no connection is made).
pub fn unix_listening(path: &Path) -> bool {
    // Columns: Num RefCount Protocol Flags Type St Inode Path. Flags 00010000 is
    // __SO_ACCEPTCON, i.e. listen() was called.
    const ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/thread-self/net/unix") else {
        return false;
    };
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(bound)) = (fields.get(3), fields.get(7)) else {
            return false;
        };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & ACCEPTCON != 0);
        listening && (Path::new(bound) == path || Path::new(bound) == absolute)
    })
}

/// Whether a socket bound to `local` receives traffic for `want`.
fn covers(local: SocketAddr, want: SocketAddr) -> bool {
    local.port() == want.port()
        && (local.ip() == want.ip()
            || (local.ip().is_unspecified() && local.is_ipv4() == want.is_ipv4())
            || local.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED))
}

/// Local addresses of the sockets listed in `/proc/thread-self/net/<file>` for each of
/// `files`, keeping only those in `state` (hex, e.g. `0A` = TCP LISTEN) if given.
fn proc_sockets(files: &[&str], state: Option<&str>) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    for file in files {
        // tcp6/udp6 are missing when IPv6 is disabled: nothing listens there then.
        let Ok(table) = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if state.is_some_and(|st| fields.get(3) != Some(&st)) {
                continue;
            }
            if let Some(local) = fields.get(1).and_then(|f| parse_proc_addr(f)) {
                found.push(local);
            }
        }
    }
    found
}

/// Decodes a `/proc/net/{tcp,udp}{,6}` address such as `0100007F:1F90`: the IP is
/// printed as native-endian 32-bit words, the port as a host-order u16.
fn parse_proc_addr(field: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = field.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip_hex.len()).step_by(8) {
        let word = u32::from_str_radix(ip_hex.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Runs `ip ARGS...` and panics with its output if it fails.
fn run_ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `ip {}` (is iproute2 installed?): {e}",
            args.join(" ")
        )
    });
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}
