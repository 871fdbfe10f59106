//! The daemon: start-up (load → check → bind), serving, reload on SIGHUP, `--check-config`, the
//! status line and the exit status. The top layer: it wires everything below together.
//!
//! Imports: every folder below ([`crate::proxy`], [`crate::config`], [`crate::policy`],
//! [`crate::ops`], [`crate::net`]); nothing imports it but `main.rs`.

pub mod run;
pub mod startup;
