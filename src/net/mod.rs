//! Moving bytes: vsock and its `unix:`/`tcp:` stand-ins, the accept loop, the relay, the
//! open-file limit and reading a bounded prefix of a stream. Knows no policy and no route.
//!
//! Imports: nothing of this crate (it is the bottom layer). enclave-app uses all of it.

pub mod accept;
pub mod endpoint;
pub mod prefix;
pub mod relay;
pub mod rlimit;
