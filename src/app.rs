//! Start-up and shutdown of the daemon: from parsed [`Options`] to an exit status.
//!
//! This module owns the order of start-up (configuration, REMOTE_ADDR check, resolver, file
//! limit, bind, serve), the mapping of failures to exit statuses (2: usage or configuration,
//! 1: fatal runtime error, 0: clean stop on SIGTERM/SIGINT) and signal handling.

use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use tracing::{error, info, warn};

use crate::cli::Options;
use crate::config;
use crate::dns::{Dns, DnsSettings, Family};
use crate::policy::{Policy, Remote};
use crate::server::{self, Counters, ServerLimits, Shared};
use crate::upstream::allowed_addresses;

/// A reason to stop before serving.
#[derive(Debug)]
pub enum Fatal {
    /// The configuration (file or arguments) is wrong: exit status 2.
    Config(String),
    /// Something outside the configuration failed: exit status 1.
    Runtime(String),
}

impl Fatal {
    fn exit_code(&self) -> ExitCode {
        match self {
            Fatal::Config(_) => ExitCode::from(2),
            Fatal::Runtime(_) => ExitCode::from(1),
        }
    }

    fn message(&self) -> &str {
        match self {
            Fatal::Config(m) | Fatal::Runtime(m) => m,
        }
    }
}

/// Runs the daemon to completion.
pub fn run(options: Options) -> ExitCode {
    crate::logging::init(options.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = options.num_workers {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(serve(options));
    // Connections still open after the drain timeout must not hold the process up.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            error!("{}", fatal.message());
            fatal.exit_code()
        }
    }
}

async fn serve(options: Options) -> Result<(), Fatal> {
    let allowlist = config::load(&options.config).map_err(|e| Fatal::Config(e.to_string()))?;
    let policy = Policy::new(allowlist);
    let family = match (options.ipv4, options.ipv6) {
        (true, _) => Family::V4Only,
        (_, true) => Family::V6Only,
        _ => Family::Both,
    };
    let dns = Dns::new(&DnsSettings {
        nameservers: options.nameservers.clone(),
        family,
        timeout: options.dns_timeout,
    })
    .map_err(Fatal::Runtime)?;

    check_remote_is_allowlisted(&policy, &dns, &options).await?;

    match crate::rlimit::raise_nofile_limit() {
        Ok(limit) => {
            let needed = u64::from(options.max_connections) * 2 + 32;
            if limit < needed {
                warn!(nofile = limit, needed, "the open-file limit is below what --max-connections needs; accepts may fail with EMFILE");
            }
        }
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }

    let listener = options.listen.bind().await.map_err(|e| {
        Fatal::Runtime(format!(
            "cannot listen on {}: {e} (is another proxy already using it?)",
            options.listen
        ))
    })?;
    let bound = listener
        .local_endpoint()
        .map(|e| e.to_string())
        .unwrap_or_else(|_| options.listen.to_string());
    info!(
        listen = %bound,
        remote = %options.remote_addr,
        port = options.remote_port,
        allowlist_entries = policy.entries().len(),
        config = %options.config.display(),
        max_connections = options.max_connections,
        "nitro-vsock-proxy {} listening", env!("CARGO_PKG_VERSION")
    );

    let shared = Arc::new(Shared {
        policy: RwLock::new(Arc::new(policy)),
        dns,
        remote: options.remote_addr.clone(),
        remote_port: options.remote_port,
        connect_timeout: options.connect_timeout,
        idle_timeout: options.idle_timeout,
        counters: Counters::default(),
    });
    let limits = ServerLimits {
        max_connections: options.max_connections as usize,
        drain_timeout: options.drain_timeout,
    };
    let left = server::serve(listener, shared.clone(), limits, shutdown_signal()).await;
    if let crate::endpoint::Endpoint::Unix(path) = &options.listen {
        let _ = std::fs::remove_file(path);
    }
    info!(
        accepted = shared
            .counters
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        denied = shared
            .counters
            .denied
            .load(std::sync::atomic::Ordering::Relaxed),
        closed_at_stop = left,
        "stopped"
    );
    Ok(())
}

/// As AWS's proxy does, refuse to start when REMOTE_ADDR:REMOTE_PORT is not allowlisted at all.
/// A name allowlisted as such needs no DNS, so a DNS outage at boot does not stop the daemon.
async fn check_remote_is_allowlisted(
    policy: &Policy,
    dns: &Dns,
    options: &Options,
) -> Result<(), Fatal> {
    let (remote, port) = (&options.remote_addr, options.remote_port);
    if policy.allows_remote_statically(remote, port) {
        return Ok(());
    }
    let via_dns = match remote {
        // An IP literal is decided without DNS unless another entry's name vouches for it.
        Remote::Ip(_) if policy.names_to_resolve(remote, port).is_empty() => Ok(false),
        _ => allowed_addresses(policy, dns, remote, port)
            .await
            .map(|(allowed, _)| !allowed.is_empty()),
    };
    match via_dns {
        Ok(true) => {
            info!(remote = %remote, "REMOTE_ADDR is allowed through the current DNS answers of allowlisted entries");
            Ok(())
        }
        Ok(false) | Err(_) => {
            let with_port: Vec<String> = policy
                .entries_with_port(port)
                .iter()
                .map(|e| e.to_string())
                .collect();
            let entries = if with_port.is_empty() {
                format!("no entry has port {port}")
            } else {
                format!("entries with port {port}: {}", with_port.join(", "))
            };
            let dns_note = match via_dns {
                Err(e) => format!(" ({e})"),
                _ => String::new(),
            };
            Err(Fatal::Config(format!(
                "{remote}:{port} is not allowed by the allowlist in {}{dns_note}; {entries}. \
                 Add `- {{address: {remote}, port: {port}}}` to allow it.",
                options.config.display()
            )))
        }
    }
}

/// Resolves on SIGTERM or SIGINT. If the handlers cannot be installed the daemon still runs
/// (and can be killed); it says so.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            info!(signal = name, "stopping");
        }
        (Err(e), _) | (_, Err(e)) => {
            warn!("cannot install signal handlers: {e}; stop the daemon with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
