//! The daemon: start-up (load → check → bind), serving, reload on SIGHUP, `--check-config`, the
//! status line, the signals and the exit status. The top layer: it wires everything below
//! together.
//!
//! - [`run`]: options → runtime → serve (build → spawn → drain) → exit status;
//! - [`startup`]: prepare (load → settings → resolver → check every route) and bind;
//! - [`settings`]: every settings struct built from the command line, once;
//! - [`reload`]: SIGHUP → prepare again → apply the routes and the allowlist;
//! - [`check_config`]: `--check-config`'s report;
//! - [`status`]: the STATUS= line and its refresh;
//! - [`signals`]: the handlers, and waiting for SIGTERM/SIGINT.
//!
//! Imports: every folder below ([`crate::proxy`], [`crate::config`], [`crate::policy`],
//! [`crate::ops`], [`crate::net`]); nothing imports it but `main.rs`. Within it the imports go one
//! way, and no two modules import each other: `run` → `check_config`, `reload`, `signals`,
//! `startup`, `status`; `check_config` → `startup`, `settings`; `reload` → `startup`, `status`;
//! `startup` → `settings`; `settings`, `status` and `signals` import none of the others.

pub mod check_config;
pub mod reload;
pub mod run;
pub mod settings;
pub mod signals;
pub mod startup;
pub mod status;
