//! Moving bytes: vsock and its `unix:`/`tcp:` stand-ins, the accept loop, the relay, the
//! open-file limit, reading a bounded prefix of a stream and the PROXY protocol's headers. Knows no policy and no route.
//!
//! Imports: nothing of this crate (it is the bottom layer). enclave-app uses all of it.

pub mod accept;
pub mod endpoint;
pub mod prefix;
pub mod proxy_header;
pub mod relay;
pub mod rlimit;
