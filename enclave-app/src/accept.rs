//! Listening for the forwarder, the server and the demo's HTTPS stand-in.
//!
//! This module owns binding, with an error that names the address and says how to fix it.
//! Accepting is the daemon's own loop ([`nitro_vsock_proxy::accept`]): every connection runs in
//! its own task inside a `conn{id peer}` span, at most `max_connections` at once (any beyond that
//! are closed at once and logged at most once a second), and accept errors such as EMFILE are
//! retried with a growing pause instead of spinning or exiting.

use std::io;

use nitro_vsock_proxy::endpoint::{Endpoint, Listener};

/// Binds `endpoint`; the error names the address and the likely fix.
pub async fn bind(endpoint: &Endpoint) -> Result<Listener, String> {
    endpoint.bind().await.map_err(|e| {
        let hint = match (endpoint, e.kind()) {
            (_, io::ErrorKind::AddrInUse) => "another process already listens there",
            (Endpoint::Tcp(_), io::ErrorKind::PermissionDenied) => {
                "ports below 1024 need root or CAP_NET_BIND_SERVICE"
            }
            (Endpoint::Tcp(_), io::ErrorKind::AddrNotAvailable) => {
                "no interface has that address; is lo up (ip link set lo up)?"
            }
            (Endpoint::Vsock { .. }, _) => {
                "vsock needs an enclave or a VM with a vsock device (/dev/vsock); elsewhere use --stand-in"
            }
            _ => "check the address",
        };
        format!("cannot listen on {endpoint}: {e} ({hint})")
    })
}

/// Accepts connections forever, running `handle(stream, peer)` for each in its own task: the
/// daemon's own accept loop ([`nitro_vsock_proxy::accept::serve`]).
pub use nitro_vsock_proxy::accept::serve;
