//! `meshbypass-node`: the node agent. This file reads the command line and
//! dispatches; the one-shot commands are in `cmd.rs`, `run` in `agent.rs`.

mod agent;
mod atomic;
mod cli;
mod cmd;
mod confdir;
mod conflist;
mod decisions;
mod gc;
mod http;
mod installer;
mod kernel;
mod kubeconfig;
mod logging;
mod metrics;
mod removal;
mod status;
mod watch;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    // --help and --version exit 0, a bad command line 2 (clap's usage).
    // The version names the map layout: agents and plugins of one layout
    // share a node's maps.
    let version = format!(
        "{} (map layout {})",
        env!("CARGO_PKG_VERSION"),
        meshbypass_ebpf::abi::LAYOUT_VERSION
    );
    let matches = cli::Cli::command().version(&*version.leak()).get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The long-running and host-changing commands say what they do.
    let chatty = matches!(
        cli.command,
        cli::Command::Run(_) | cli::Command::Install { .. } | cli::Command::Uninstall { .. }
    );
    logging::init(cli.verbose, chatty, cli.log_format);
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
