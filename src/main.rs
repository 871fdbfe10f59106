//! `nitro-vsock-proxy`: parse the command line, run the daemon, map the outcome to an exit status.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let options = nitro_vsock_proxy::cli::Options::parse();
    nitro_vsock_proxy::app::run(options)
}
