//! Command-line parsing (no dependency: a handful of flags).

use std::{path::PathBuf, time::Duration};

use meshbypass_ebpf::pins::DEFAULT_BPF_ROOT;

use crate::{
    agent::RunOptions,
    installer::{DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR, DEFAULT_STATE_DIR},
    kubeconfig::{DEFAULT_CA_FILE, DEFAULT_KUBECONFIG_OUT, DEFAULT_TOKEN_FILE},
};

/// `/readyz` and `/metrics` (hostNetwork: a port no common node agent uses).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9478";
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(60);
/// The DaemonSet of `install/deploy/daemonset.yaml`.
pub const DEFAULT_DAEMONSET: &str = "meshbypass-node";

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
  install    one shot, for hosts without Kubernetes: check the settings
             with the plugin's parser, load (as `load`; a failure is a
             warning: the plugin is installed anyway), copy the plugin into
             the CNI bin dir, chain it into the primary conflist
  uninstall  one shot: remove our conflist entry, then the plugin binary;
             the maps stay unless --cleanup
  run        the DaemonSet's main: load, install, keep installed (inotify),
             serve /readyz and /metrics, GC dead pods' state. Settings are
             checked by the plugin's parser first (a bad edit keeps the last
             good entry). A failed load still installs (redirect without the
             bypass) and is retried. SIGTERM/SIGINT leave the plugin in place
             unless the DaemonSet is being deleted (asked of the API server):
             then entry first, then binary; maps and pod links stay unless
             --cleanup

options:
  --bpf-root DIR         pin root (default /sys/fs/bpf/meshbypass)
  --json                 machine-readable output (status, selftest, load)
  --no-selftest          load, install, run: do not probe the kernel
  -v, --verbose          debug logs on stderr
install, uninstall, run:
  --cni-bin-dir DIR      default /opt/cni/bin
  --cni-conf-dir DIR     default /etc/cni/net.d
  --plugin-binary FILE   the plugin to copy (default: `meshbypass` beside
                         this executable)
  --plugin-config FILE   JSON object: our conflist entry's settings
                         (default {\"type\": \"meshbypass\"}); `bpfRoot` and
                         `stateDir` are added when non-default flags set them
  --cleanup              uninstall, run: also unload the maps and pod links
                         (run: only when the DaemonSet is being deleted)
run:
  --listen ADDR:PORT     HTTP for /readyz, /healthz, /metrics
                         (default 0.0.0.0:9478)
  --daemonset NAME       our DaemonSet, in the service account's namespace
                         (default meshbypass-node): at SIGTERM the plugin is
                         removed only if it is gone or being deleted
  --state-dir DIR        the plugin's state records (default /run/meshbypass)
  --gc-interval SECS     GC of state whose netns is gone (default 60)
  --kubeconfig-out FILE  plugin kubeconfig, written when in a cluster
                         (default /etc/cni/net.d/meshbypass-kubeconfig)
  --token-file FILE      service account token
                         (default /var/run/secrets/kubernetes.io/serviceaccount/token)
  --ca-file FILE         service account CA (default .../serviceaccount/ca.crt)";

/// Where the plugin goes and with which settings (install, uninstall).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub plugin_binary: Option<PathBuf>,
    pub plugin_config: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Load {
        selftest: bool,
    },
    Unload,
    Status,
    Selftest,
    Install {
        paths: HostPaths,
        selftest: bool,
    },
    Uninstall {
        paths: HostPaths,
        cleanup: bool,
    },
    Run(Box<RunOptions>),
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

/// Flags that take a value, and the commands that accept them.
const VALUE_FLAGS: [(&str, &[&str]); 13] = [
    ("--bpf-root", &[]),
    ("--cgroup", &["selftest-probe"]),
    ("--cni-bin-dir", &["install", "uninstall", "run"]),
    ("--cni-conf-dir", &["install", "uninstall", "run"]),
    ("--plugin-binary", &["install", "run"]),
    ("--plugin-config", &["install", "run"]),
    ("--listen", &["run"]),
    ("--state-dir", &["run"]),
    ("--gc-interval", &["run"]),
    ("--kubeconfig-out", &["run"]),
    ("--token-file", &["run"]),
    ("--ca-file", &["run"]),
    ("--daemonset", &["run"]),
];

/// The flag's static name and whether `command` takes it; `None` if unknown.
fn value_flag(flag: &str, command: &str) -> Option<(&'static str, bool)> {
    VALUE_FLAGS
        .iter()
        .find(|(f, _)| *f == flag)
        .map(|(f, cmds)| (*f, cmds.is_empty() || cmds.contains(&command)))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    match n.parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(format!(
            "--gc-interval wants a positive number of seconds, got {s:?}"
        )),
    }
}

pub fn parse(args: &[String]) -> Result<Cli, String> {
    let mut it = args.iter();
    let name = it.next().ok_or("no command given")?;
    let mut values: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    let mut json = false;
    let mut verbose = false;
    let mut selftest = true;
    let mut cleanup = false;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--no-selftest" => selftest = false,
            "--cleanup" => cleanup = true,
            "-v" | "--verbose" => verbose = true,
            flag => match value_flag(flag, name) {
                Some((flag, true)) => {
                    let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
                    values.insert(flag, v.clone());
                }
                Some((flag, false)) => return Err(format!("{flag} does not apply to {name}")),
                None => return Err(format!("unknown option {flag:?}")),
            },
        }
    }
    if cleanup && !matches!(name.as_str(), "uninstall" | "run") {
        return Err(format!("--cleanup does not apply to {name}"));
    }
    let path = |flag: &str, default: &str| -> Result<PathBuf, String> {
        let p = PathBuf::from(values.get(flag).map_or(default, String::as_str));
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(format!("{flag} must be absolute, got {}", p.display()))
        }
    };
    let opt_path = |flag: &str| -> Result<Option<PathBuf>, String> {
        values.get(flag).map(|_| path(flag, "")).transpose()
    };
    let bpf_root = path("--bpf-root", DEFAULT_BPF_ROOT)?;
    let host_paths = || -> Result<HostPaths, String> {
        Ok(HostPaths {
            cni_bin_dir: path("--cni-bin-dir", DEFAULT_CNI_BIN_DIR)?,
            cni_conf_dir: path("--cni-conf-dir", DEFAULT_CNI_CONF_DIR)?,
            plugin_binary: opt_path("--plugin-binary")?,
            plugin_config: opt_path("--plugin-config")?,
        })
    };
    let command = match name.as_str() {
        "load" => Command::Load { selftest },
        "unload" => Command::Unload,
        "status" => Command::Status,
        "selftest" => Command::Selftest,
        "install" => Command::Install {
            paths: host_paths()?,
            selftest,
        },
        "uninstall" => Command::Uninstall {
            paths: host_paths()?,
            cleanup,
        },
        "run" => {
            let p = host_paths()?;
            Command::Run(Box::new(RunOptions {
                bpf_root: bpf_root.clone(),
                cni_bin_dir: p.cni_bin_dir,
                cni_conf_dir: p.cni_conf_dir,
                plugin_binary: p.plugin_binary,
                plugin_config: p.plugin_config,
                listen: values
                    .get("--listen")
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_LISTEN.into()),
                state_dir: path("--state-dir", DEFAULT_STATE_DIR)?,
                gc_interval: values
                    .get("--gc-interval")
                    .map_or(Ok(DEFAULT_GC_INTERVAL), |s| parse_secs(s))?,
                cleanup,
                selftest,
                kubeconfig_out: path("--kubeconfig-out", DEFAULT_KUBECONFIG_OUT)?,
                token_file: path("--token-file", DEFAULT_TOKEN_FILE)?,
                ca_file: path("--ca-file", DEFAULT_CA_FILE)?,
                daemonset: match values.get("--daemonset") {
                    None => DEFAULT_DAEMONSET.into(),
                    Some(n) if crate::removal::is_object_name(n) => n.clone(),
                    Some(n) => return Err(format!("--daemonset wants a Kubernetes object name, got {n:?}")),
                },
            }))
        }
        "selftest-probe" => Command::SelftestProbe {
            cgroup: values
                .get("--cgroup")
                .ok_or("selftest-probe needs --cgroup")?
                .into(),
        },
        "-h" | "--help" | "help" => return Err("help".into()),
        other => return Err(format!("unknown command {other:?}")),
    };
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
            "load --listen 1.2.3.4:5",
            "status --cleanup",
            "install --state-dir /x",
            "run --gc-interval 0",
            "run --gc-interval soon",
            "run --cni-conf-dir etc/cni",
            "uninstall --plugin-binary /x",
            "run --daemonset ../x",
            "install --daemonset x",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_install_uninstall_and_run() {
        let c = parse(&args(
            "install --cni-bin-dir /b --cni-conf-dir /c --plugin-config /s.json",
        ))
        .unwrap();
        assert_eq!(
            c.command,
            Command::Install {
                paths: HostPaths {
                    cni_bin_dir: "/b".into(),
                    cni_conf_dir: "/c".into(),
                    plugin_binary: None,
                    plugin_config: Some("/s.json".into()),
                },
                selftest: true,
            }
        );
        let c = parse(&args("uninstall --cleanup")).unwrap();
        let Command::Uninstall { paths, cleanup } = c.command else {
            panic!("not uninstall: {:?}", c.command)
        };
        assert!(cleanup);
        assert_eq!(paths.cni_bin_dir, PathBuf::from(DEFAULT_CNI_BIN_DIR));
        let c = parse(&args(
            "run --listen 127.0.0.1:0 --gc-interval 5s --no-selftest --bpf-root /sys/fs/bpf/t",
        ))
        .unwrap();
        let Command::Run(opts) = c.command else {
            panic!("not run: {:?}", c.command)
        };
        assert_eq!(opts.listen, "127.0.0.1:0");
        assert_eq!(opts.gc_interval, Duration::from_secs(5));
        assert!(!opts.selftest);
        assert_eq!(opts.bpf_root, PathBuf::from("/sys/fs/bpf/t"));
        assert_eq!(opts.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(opts.token_file, PathBuf::from(DEFAULT_TOKEN_FILE));
        assert_eq!(opts.daemonset, DEFAULT_DAEMONSET);
        let c = parse(&args("run --daemonset mb-node")).unwrap();
        let Command::Run(opts) = c.command else {
            panic!("not run: {:?}", c.command)
        };
        assert_eq!(opts.daemonset, "mb-node");
    }
}
