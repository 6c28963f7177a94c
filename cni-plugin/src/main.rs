//! `meshbypass`: the chained CNI plugin. Reads the CNI environment and the
//! network configuration on stdin, runs the command, prints the result (or
//! the spec's error JSON) on stdout. The command line only answers `--help`
//! and `--version` (a runtime passes no arguments).

use std::io::Read;

use meshbypass_cni::{cmd, env::ProcessEnv, version};

/// 4 MiB: far above any real configuration; a bound keeps a runaway writer harmless.
const MAX_STDIN: u64 = 4 << 20;

fn main() {
    if std::env::args_os().len() > 1 {
        command_line();
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let reply = match read {
        Ok(n) if n as u64 > MAX_STDIN => cmd::too_large(),
        Ok(_) => cmd::run(&ProcessEnv, &stdin),
        Err(e) => cmd::unreadable(e),
    };
    if !reply.stdout.is_empty() {
        println!("{}", reply.stdout);
    }
    std::process::exit(reply.code);
}

/// `--help` and `--version` print and exit 0; any other argument is a
/// usage error (exit 2). Returns only for a bare `--`.
fn command_line() {
    let version: &'static str = format!(
        "{} (map layout {}; CNI {})",
        env!("CARGO_PKG_VERSION"),
        meshbypass_ebpf::abi::LAYOUT_VERSION,
        version::SUPPORTED_VERSIONS.join(", ")
    )
    .leak();
    clap::Command::new("meshbypass")
        .version(version)
        .about("meshbypass chained CNI plugin: a meshed pod's sidecar redirect and its sockmap bypass")
        .after_help(
            "A container runtime runs it: CNI_COMMAND (ADD, DEL, CHECK, STATUS, GC, VERSION) and the \
             other CNI_* variables in the environment, the network configuration on stdin, the \
             result on stdout. Settings: the conflist entry (docs/configuration.md). Each ADD and \
             DEL is logged as one JSON line under <stateDir>/log/, which `meshbypass-node run` \
             re-emits.",
        )
        .get_matches();
}
