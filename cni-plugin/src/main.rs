//! `meshbypass`: the chained CNI plugin. Reads the CNI environment and the
//! network configuration on stdin, runs the command, prints the result (or
//! the spec's error JSON) on stdout.

use std::io::Read;

use meshbypass_cni::{cmd, env::ProcessEnv};

/// 4 MiB: far above any real configuration; a bound keeps a runaway writer harmless.
const MAX_STDIN: u64 = 4 << 20;

fn main() {
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
