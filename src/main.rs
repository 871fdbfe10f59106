//! `nitro-vsock-proxy`: parse the command line, run the daemon, map the outcome to an exit status.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let options = match nitro_vsock_proxy::config::cli::Options::try_parse() {
        Ok(options) => options,
        // A usage error under systemd goes to the journal as an error, not at the default level.
        Err(e) if e.use_stderr() && nitro_vsock_proxy::ops::systemd::stderr_is_journal() => {
            for line in e.render().to_string().lines() {
                eprintln!("<3>{line}");
            }
            std::process::exit(e.exit_code())
        }
        Err(e) => e.exit(),
    };
    nitro_vsock_proxy::daemon::run::run(options)
}
