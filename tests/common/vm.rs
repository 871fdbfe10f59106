//! The gate of the tests that need real AF_VSOCK: they do their work only inside the test VM
//! (tests/vm/, `make vm-test`), whose `/init` sets `NVP_VM_TIER=1` and loads `vsock_loopback`.
//! On the host they print that they were skipped; tests/vm/run.sh fails a VM run whose console
//! shows that text, so the gate cannot silently skip them where they must run.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Once;

/// Set to `1` by the VM's `/init` (tests/vm/init-tier1); absent on the host.
pub const VM_ENV: &str = "NVP_VM_TIER";

/// Whether this process runs inside the test VM. On the host: prints, once per test program,
/// "`program`: SKIPPED on this host: ..." (straight to stderr, past libtest's output capture)
/// and returns false.
///
/// # Panics
/// If the VM marker is set but the vsock loopback transport is not loaded: that is not the test
/// VM, and connecting to vsock there could reach a real hypervisor.
pub fn in_vm(program: &str) -> bool {
    static SKIP: Once = Once::new();
    if std::env::var(VM_ENV).as_deref() != Ok("1") {
        SKIP.call_once(|| {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{program}: SKIPPED on this host: real AF_VSOCK needs the test VM \
                 (run `make vm-test`); the host has no vsock loopback"
            );
        });
        return false;
    }
    assert!(
        std::path::Path::new("/sys/module/vsock_loopback").exists(),
        "{VM_ENV}=1 but the vsock_loopback module is not loaded: this is not the test VM \
         (tests/vm/init-tier1 loads it); refusing to use vsock here"
    );
    true
}

/// The socket's address family (SO_DOMAIN), read from the kernel: lets a test prove it used
/// AF_VSOCK, so a fallback to a stand-in transport cannot pass it.
pub fn socket_domain(sock: &impl AsFd) -> i32 {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt(SO_DOMAIN): {}",
        std::io::Error::last_os_error()
    );
    domain
}
