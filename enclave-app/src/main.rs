//! `enclave-app`: the enclave side of the Nitro Enclaves workshop's secure local channel.
//!
//! One binary, the workshop's three commands with its arguments, and the ingress bridge:
//! - `forwarder LOCAL_IP LOCAL_PORT REMOTE_CID REMOTE_PORT`: TCP in the enclave to the parent's
//!   nitro-vsock-proxy over vsock ([`forwarder`]);
//! - `server PORT`: answers region queries on vsock with S3 prefixes ([`server`], over
//!   [`protocol`], [`ranges`], [`cache`] and [`fetch`]);
//! - `client CID PORT QUERY`: the parent-side client ([`client`]);
//! - `egress`: transparent egress, any unmodified client reaching what the parent allows by
//!   name ([`egress`]).
//! - `ingress --listen vsock:PORT --to tcp:IP:PORT`: the parent's ingress route into a TCP
//!   server in the enclave, keeping or consuming its PROXY header ([`ingress`]).
//!
//! [`accept`] is the accept loop they share; [`cli`] the command line; [`standin`] the hidden
//! `demo-https` command, the HTTPS stand-in for ip-ranges.amazonaws.com used by `make demo` and
//! the tests. Transports, the relay and the logger come from the daemon's library
//! (`nitro_vsock_proxy`). This file only dispatches and maps results to exit statuses: 0 done,
//! 1 runtime failure (the message says what and how to fix it), 2 usage error.

mod accept;
mod cache;
mod cli;
mod client;
mod egress;
mod fetch;
mod forwarder;
mod ingress;
mod protocol;
mod query_reader;
mod ranges;
mod server;
mod standin;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nitro_vsock_proxy::ops::logging::LogFormat;
use tracing::{error, info, warn};

use crate::cache::Cache;
use crate::cli::{Cli, Command};
use crate::fetch::Fetcher;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Client(args) => client::main(args.options()),
        Command::Egress(args) if args.print_setup => {
            print!(
                "{}",
                egress::setup::script(args.listen, args.dns_listen, args.fake_ip)
            );
            ExitCode::SUCCESS
        }
        Command::Egress(args) => run_service(egress::run(args.options(), shutdown_signal())),
        Command::Forwarder(args) => run_service(forwarder::run(args.options(), shutdown_signal())),
        Command::Ingress(args) => run_service(ingress::run(args.options(), shutdown_signal())),
        // The stand-in has nothing worth draining: it just stops at the signal.
        Command::DemoHttps(args) => run_service(async move {
            tokio::select! {
                result = standin::run(args.options()) => result,
                () = shutdown_signal() => Ok(()),
            }
        }),
        Command::Server(args) => run_service(async move {
            let fetcher = Arc::new(Fetcher::new(args.fetch_settings())?);
            let source = fetcher.describe();
            let loader: cache::Loader = Box::new(move || {
                let fetcher = fetcher.clone();
                Box::pin(async move { fetcher.download().await.map_err(|e| fetcher.explain(&e)) })
            });
            let cache = Cache::new(loader, args.url.to_string(), args.cache_ttl, args.max_stale);
            server::run(args.options(), cache, source, shutdown_signal()).await
        }),
    }
}

/// Runs a long-lived command on a multi-thread runtime until it returns (after SIGTERM/SIGINT
/// and its drain) or fails.
fn run_service(service: impl Future<Output = Result<(), String>>) -> ExitCode {
    let _log = nitro_vsock_proxy::ops::logging::init(LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(service);
    // Connections still open after the drain timeout must not hold the process up.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            ExitCode::from(1)
        }
    }
}

/// Resolves on SIGTERM or SIGINT (the forwarder and the server then drain). If the handlers
/// cannot be installed the command still runs, and says so.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            info!(signal = name, "stopping");
        }
        (Err(e), _) | (_, Err(e)) => {
            warn!("cannot install signal handlers: {e}; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
