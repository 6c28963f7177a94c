//! `meshbypass-node`: the node agent. This file reads the command line and
//! dispatches; the subcommands are in `cmd.rs`, `run` in `agent.rs`.

mod agent;
mod atomic;
mod cli;
mod cmd;
mod confdir;
mod conflist;
mod gc;
mod http;
mod installer;
mod kubeconfig;
mod metrics;
mod removal;
mod watch;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match cli::parse(&args) {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("meshbypass-node: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    // The long-running and host-changing commands say what they do.
    let chatty = matches!(
        cmd.command,
        cli::Command::Run(_) | cli::Command::Install { .. } | cli::Command::Uninstall { .. }
    );
    init_logging(cmd.verbose, chatty);
    match cmd::run(cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshbypass-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: bool, chatty: bool) {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                eprintln!("{}: {}", r.level().as_str().to_lowercase(), r.args());
            }
        }
        fn flush(&self) {}
    }
    let level = match (verbose, chatty) {
        (true, _) => log::LevelFilter::Debug,
        (false, true) => log::LevelFilter::Info,
        (false, false) => log::LevelFilter::Warn,
    };
    if log::set_boxed_logger(Box::new(Stderr(level))).is_ok() {
        log::set_max_level(level);
    }
}
