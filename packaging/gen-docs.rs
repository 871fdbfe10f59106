//! Writes the man page `nitro-vsock-proxy(8)` and the bash, zsh and fish completions from the
//! command line's own clap definitions, so they say what `--help` says and never drift from it.
//! The RPM and the .deb run it at build time:
//!
//!   cargo run --release --example gen-docs -- OUT_DIR
//!
//! OUT_DIR gets `nitro-vsock-proxy.8`, `nitro-vsock-proxy.bash`, `_nitro-vsock-proxy` (zsh) and
//! `nitro-vsock-proxy.fish`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use nitro_vsock_proxy::config::cli::Options;

const NAME: &str = "nitro-vsock-proxy";

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-docs: cannot write into {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let command = Options::command().name(NAME);
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(out.join(format!("{NAME}.8")), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command.clone(), NAME, out)?;
    }
    Ok(())
}
