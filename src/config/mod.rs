//! What the operator wrote: the configuration file ([`file`]: its schema, [`error`]: what can be
//! wrong with it, read by
//! [`read`], located by [`locate`], its fields parsed by [`fields`]), the command line ([`cli`]),
//! a route's remote ([`remote`]) and the `{region}` it may need from the instance metadata
//! service ([`imds`]).
//!
//! Imports: [`crate::net`] (endpoints), [`crate::ops`] (the metrics endpoint's checks),
//! [`crate::policy`] (host patterns, the allowlist it builds). Nothing here connects anywhere
//! except [`imds`], and nothing decides.

pub mod cli;
pub mod error;
pub mod fields;
pub mod file;
pub mod imds;
pub mod locate;
pub mod read;
pub mod remote;

pub use error::ConfigError;
pub use file::{load, parse, Config, Ech, Ingress, RouteConfig, RouteKind};
pub use read::MAX_FILE_SIZE;
