//! Command-line parsing (no dependency: a handful of flags).

use std::path::PathBuf;

use meshbypass_ebpf::pins::DEFAULT_BPF_ROOT;

pub const USAGE: &str = "\
usage: meshbypass-node <command> [--bpf-root DIR] [options]

commands:
  load       create the node's pinned maps and programs, or reuse them;
             runs the kernel selftest once and records its verdict
             (--no-selftest to skip; `auto` then means proxy-only)
  unload     detach everything and remove every pin (per-pod links too)
  status     show whether the maps are loaded, registered pods, counters
             (--json for one JSON object)
  selftest   probe this kernel's sockmap hazards in a private netns and
             cgroup; records the verdict when the maps are loaded (--json)

options:
  --bpf-root DIR   pin root (default /sys/fs/bpf/meshbypass)
  --json           machine-readable output (status, selftest, load)
  -v, --verbose    debug logs on stderr";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Load {
        selftest: bool,
    },
    Unload,
    Status,
    Selftest,
    /// Internal: the selftest's child process.
    SelftestProbe {
        cgroup: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct Cli {
    pub command: Command,
    pub bpf_root: PathBuf,
    pub json: bool,
    pub verbose: bool,
}

pub fn parse(args: &[String]) -> Result<Cli, String> {
    let mut it = args.iter();
    let name = it.next().ok_or("no command given")?;
    let mut bpf_root = PathBuf::from(DEFAULT_BPF_ROOT);
    let mut json = false;
    let mut verbose = false;
    let mut selftest = true;
    let mut cgroup = None;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bpf-root" => bpf_root = it.next().ok_or("--bpf-root needs a directory")?.into(),
            "--cgroup" => cgroup = Some(PathBuf::from(it.next().ok_or("--cgroup needs a directory")?)),
            "--json" => json = true,
            "--no-selftest" => selftest = false,
            "-v" | "--verbose" => verbose = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let command = match name.as_str() {
        "load" => Command::Load { selftest },
        "unload" => Command::Unload,
        "status" => Command::Status,
        "selftest" => Command::Selftest,
        "selftest-probe" => Command::SelftestProbe {
            cgroup: cgroup.ok_or("selftest-probe needs --cgroup")?,
        },
        "-h" | "--help" | "help" => return Err("help".into()),
        other => return Err(format!("unknown command {other:?}")),
    };
    if !bpf_root.is_absolute() {
        return Err(format!("--bpf-root must be absolute, got {}", bpf_root.display()));
    }
    Ok(Cli {
        command,
        bpf_root,
        json,
        verbose,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_commands_and_flags() {
        let c = parse(&args("status --json --bpf-root /sys/fs/bpf/x")).unwrap();
        assert_eq!(c.command, Command::Status);
        assert!(c.json);
        assert_eq!(c.bpf_root, PathBuf::from("/sys/fs/bpf/x"));
        let c = parse(&args("load --no-selftest")).unwrap();
        assert_eq!(c.command, Command::Load { selftest: false });
        assert_eq!(c.bpf_root, PathBuf::from(DEFAULT_BPF_ROOT));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "frobnicate",
            "status --bogus",
            "status --bpf-root",
            "load --bpf-root rel",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
