//! `enclave-app`: the enclave side of the workshop chain (forwarder, server, client).
//!
//! A stub until its issue lands; it exists so the workspace layout is in place.

fn main() {
    eprintln!(
        "enclave-app: not implemented yet (forwarder, server and client come with their issue)"
    );
    std::process::exit(2);
}
