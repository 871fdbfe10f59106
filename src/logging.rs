//! Log output: tracing-subscriber on standard error, text or JSON, level from `RUST_LOG`.
//!
//! This module owns the one place where the subscriber is installed, so the rest of the code only
//! emits `tracing` events and spans.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber. `RUST_LOG` selects levels (default `info`); an invalid
/// `RUST_LOG` falls back to `info` and says so rather than silencing the daemon.
pub fn init(format: LogFormat) {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("{spec:?}: {e}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    if let Err(e) = installed {
        eprintln!("nitro-vsock-proxy: cannot install the logger: {e}");
    }
    if let Some(problem) = bad_filter {
        tracing::warn!("ignoring invalid RUST_LOG {problem}; logging at info");
    }
}
