//! The command line (clap). Every flag can also come from a `MESHBYPASS_*`
//! environment variable (`--bpf-root` from `MESHBYPASS_BPF_ROOT`, ...); a
//! flag on the command line wins. `--flag value` and `--flag=value` both work.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::BoolishValueParser};
use meshbypass_ebpf::pins::DEFAULT_BPF_ROOT;

use crate::{
    installer::{DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR, DEFAULT_STATE_DIR},
    kubeconfig::{DEFAULT_CA_FILE, DEFAULT_KUBECONFIG_OUT, DEFAULT_TOKEN_FILE},
};

/// `/readyz` and `/metrics` (hostNetwork: a port no common node agent uses).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9478";
/// The DaemonSet of `install/deploy/daemonset.yaml`.
pub const DEFAULT_DAEMONSET: &str = "meshbypass-node";

#[derive(Debug, Parser)]
#[command(
    name = "meshbypass-node",
    version,
    // A flag given twice: the last one wins (a manifest's args after an
    // image's defaults).
    args_override_self = true,
    about = "meshbypass node agent: the node's shared BPF maps, the kernel selftest, \
             installing the CNI plugin, and the DaemonSet's main loop",
    after_help = "Every flag can also be set by an environment variable: MESHBYPASS_ and the \
                  flag's name in capitals (--bpf-root: MESHBYPASS_BPF_ROOT)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Pin root of the node's maps, programs and pod links.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "MESHBYPASS_BPF_ROOT",
        default_value = DEFAULT_BPF_ROOT,
        value_parser = absolute_path
    )]
    pub bpf_root: PathBuf,
    /// Debug logs.
    #[arg(short, long, global = true, env = "MESHBYPASS_VERBOSE", value_parser = BoolishValueParser::new())]
    pub verbose: bool,
    /// Log lines (stderr) and the plugin's decisions (`run`, stdout) as
    /// text or as one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        env = "MESHBYPASS_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Create the node's pinned maps and programs, or reuse them; runs the
    /// kernel selftest once and records its verdict.
    Load {
        #[command(flatten)]
        selftest: Selftest,
        #[command(flatten)]
        output: Output,
        #[command(flatten)]
        sizes: MapSizes,
    },
    /// Detach everything and remove every pin (per-pod links too).
    Unload {
        #[command(flatten)]
        output: Output,
    },
    /// Whether the maps are loaded, registered pods (with their names from
    /// the plugin's records), map usage, counters.
    Status {
        #[command(flatten)]
        output: Output,
        /// The plugin's state records (pod namespace and name by netns).
        #[arg(long, value_name = "DIR", env = "MESHBYPASS_STATE_DIR",
              default_value = DEFAULT_STATE_DIR, value_parser = absolute_path)]
        state_dir: PathBuf,
    },
    /// Probe this kernel's sockmap hazards in a private netns and cgroup;
    /// records the verdict when the maps are loaded.
    Selftest {
        #[command(flatten)]
        output: Output,
    },
    /// One shot, for hosts without Kubernetes: check the settings with the
    /// plugin's parser, load (a failure is a warning: the plugin is
    /// installed anyway), copy the plugin into the CNI bin dir, chain it into
    /// the primary conflist.
    Install {
        #[command(flatten)]
        paths: HostPaths,
        #[command(flatten)]
        selftest: Selftest,
        #[command(flatten)]
        sizes: MapSizes,
    },
    /// One shot: remove our conflist entry, then the plugin binary; the maps
    /// stay unless --cleanup.
    Uninstall {
        #[command(flatten)]
        dirs: CniDirs,
        /// Also unload the maps and pod links.
        #[arg(long, env = "MESHBYPASS_CLEANUP", value_parser = BoolishValueParser::new())]
        cleanup: bool,
    },
    /// The DaemonSet's main: load, install, keep installed, serve /readyz
    /// and /metrics, re-emit the plugin's decisions, GC dead pods' state.
    ///
    /// Settings are checked by the plugin's parser first (a bad edit keeps
    /// the last good entry). A failed load still installs (redirect without
    /// the bypass) and is retried. SIGTERM/SIGINT leave the plugin in place
    /// unless the DaemonSet is being deleted (asked of the API server): then
    /// entry first, then binary; maps and pod links stay unless --cleanup.
    Run(RunOptions),
    /// Internal: the selftest's child process.
    #[command(hide = true)]
    SelftestProbe {
        #[arg(long)]
        cgroup: PathBuf,
    },
}

/// `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct Output {
    /// Machine-readable output: one JSON object.
    #[arg(long, env = "MESHBYPASS_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
}

/// `--socket-capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct MapSizes {
    /// How many sockets the node's socket maps hold when this command
    /// creates them (existing maps keep their size: `unload` to resize);
    /// one pod may use a quarter of them, its further sockets stay on TCP.
    #[arg(long, value_name = "N", env = "MESHBYPASS_SOCKET_CAPACITY",
          default_value_t = meshbypass_ebpf::loader::DEFAULT_SOCKET_CAPACITY,
          value_parser = clap::value_parser!(u32).range(64..=4_194_304))]
    pub socket_capacity: u32,
}

impl MapSizes {
    pub fn load_options(self) -> meshbypass_ebpf::LoadOptions {
        meshbypass_ebpf::LoadOptions::with_capacity(self.socket_capacity)
    }
}

/// `--no-selftest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct Selftest {
    /// Do not probe the kernel (`auto` then means proxy-only until a
    /// selftest verdict is recorded).
    #[arg(long, env = "MESHBYPASS_NO_SELFTEST", value_parser = BoolishValueParser::new())]
    pub no_selftest: bool,
}

impl Selftest {
    pub fn wanted(self) -> bool {
        !self.no_selftest
    }
}

/// The host's CNI directories.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct CniDirs {
    /// Where the plugin binary goes (k3s: /var/lib/rancher/k3s/data/current/bin).
    #[arg(long, value_name = "DIR", env = "MESHBYPASS_CNI_BIN_DIR",
          default_value = DEFAULT_CNI_BIN_DIR, value_parser = absolute_path)]
    pub cni_bin_dir: PathBuf,
    /// Where the primary CNI's conflist is (k3s: /var/lib/rancher/k3s/agent/etc/cni/net.d).
    #[arg(long, value_name = "DIR", env = "MESHBYPASS_CNI_CONF_DIR",
          default_value = DEFAULT_CNI_CONF_DIR, value_parser = absolute_path)]
    pub cni_conf_dir: PathBuf,
}

/// Where the plugin goes and with which settings (install, run).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct HostPaths {
    #[command(flatten)]
    pub dirs: CniDirs,
    /// The plugin to copy (default: `meshbypass` beside this executable).
    #[arg(long, value_name = "FILE", env = "MESHBYPASS_PLUGIN_BINARY", value_parser = absolute_path)]
    pub plugin_binary: Option<PathBuf>,
    /// JSON object: our conflist entry's settings (default {"type":
    /// "meshbypass"}); `bpfRoot` and `stateDir` are added from the flags
    /// when absent.
    #[arg(long, value_name = "FILE", env = "MESHBYPASS_PLUGIN_CONFIG", value_parser = absolute_path)]
    pub plugin_config: Option<PathBuf>,
}

/// Everything `run` is told on the command line (`--bpf-root` is global).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RunOptions {
    #[command(flatten)]
    pub sizes: MapSizes,
    #[command(flatten)]
    pub paths: HostPaths,
    #[command(flatten)]
    pub selftest: Selftest,
    /// HTTP for /readyz, /healthz, /metrics.
    #[arg(long, value_name = "ADDR:PORT", env = "MESHBYPASS_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// The plugin's state records and its decision log (`log/`).
    #[arg(long, value_name = "DIR", env = "MESHBYPASS_STATE_DIR",
          default_value = DEFAULT_STATE_DIR, value_parser = absolute_path)]
    pub state_dir: PathBuf,
    /// Seconds between GCs of state whose netns is gone.
    #[arg(long, value_name = "SECS", env = "MESHBYPASS_GC_INTERVAL",
          default_value = "60", value_parser = parse_secs)]
    pub gc_interval: Duration,
    /// Also unload the maps and pod links, when the DaemonSet is being deleted.
    #[arg(long, env = "MESHBYPASS_CLEANUP", value_parser = BoolishValueParser::new())]
    pub cleanup: bool,
    /// Plugin kubeconfig, written when in a cluster.
    #[arg(long, value_name = "FILE", env = "MESHBYPASS_KUBECONFIG_OUT",
          default_value = DEFAULT_KUBECONFIG_OUT, value_parser = absolute_path)]
    pub kubeconfig_out: PathBuf,
    /// Service account token.
    #[arg(long, value_name = "FILE", env = "MESHBYPASS_TOKEN_FILE",
          default_value = DEFAULT_TOKEN_FILE, value_parser = absolute_path)]
    pub token_file: PathBuf,
    /// Service account CA.
    #[arg(long, value_name = "FILE", env = "MESHBYPASS_CA_FILE",
          default_value = DEFAULT_CA_FILE, value_parser = absolute_path)]
    pub ca_file: PathBuf,
    /// Our DaemonSet, in the service account's namespace: at SIGTERM the
    /// plugin is removed only if it is gone or being deleted.
    #[arg(long, value_name = "NAME", env = "MESHBYPASS_DAEMONSET",
          default_value = DEFAULT_DAEMONSET, value_parser = object_name)]
    pub daemonset: String,
}

fn absolute_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("must be an absolute path, got {s:?}"))
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    match n.parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("wants a positive number of seconds, got {s:?}")),
    }
}

fn object_name(s: &str) -> Result<String, String> {
    if crate::removal::is_object_name(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("wants a Kubernetes object name, got {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(s: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("meshbypass-node").chain(s.split_whitespace()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands_and_flags() {
        let c = parse("status --json --bpf-root /sys/fs/bpf/x").unwrap();
        assert_eq!(
            c.command,
            Command::Status {
                output: Output { json: true },
                state_dir: DEFAULT_STATE_DIR.into()
            }
        );
        assert_eq!(c.bpf_root, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(c.log_format, LogFormat::Text);
        // --flag=value, and global flags before the command.
        let c = parse("--bpf-root=/sys/fs/bpf/y load --no-selftest --log-format=json").unwrap();
        assert_eq!(
            c.command,
            Command::Load {
                selftest: Selftest { no_selftest: true },
                output: Output { json: false },
                sizes: MapSizes {
                    socket_capacity: meshbypass_ebpf::loader::DEFAULT_SOCKET_CAPACITY
                },
            }
        );
        let sized = parse("load --socket-capacity=4096").unwrap();
        let Command::Load { sizes, .. } = sized.command else {
            panic!("not load: {:?}", sized.command)
        };
        assert_eq!(sizes.load_options().socket_capacity, 4096);
        assert_eq!(sizes.load_options().pod_socket_budget, 1024);
        assert_eq!(c.bpf_root, PathBuf::from("/sys/fs/bpf/y"));
        assert_eq!(c.log_format, LogFormat::Json);
        let c = parse("status --bpf-root /a --bpf-root=/b").unwrap();
        assert_eq!(c.bpf_root, PathBuf::from("/b"));
        let c = parse("unload").unwrap();
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
            "run --log-format yaml",
            "load --socket-capacity 10",
            "run --socket-capacity lots",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_install_uninstall_and_run() {
        let c = parse("install --cni-bin-dir /b --cni-conf-dir=/c --plugin-config /s.json").unwrap();
        assert_eq!(
            c.command,
            Command::Install {
                paths: HostPaths {
                    dirs: CniDirs {
                        cni_bin_dir: "/b".into(),
                        cni_conf_dir: "/c".into(),
                    },
                    plugin_binary: None,
                    plugin_config: Some("/s.json".into()),
                },
                selftest: Selftest { no_selftest: false },
                sizes: MapSizes {
                    socket_capacity: meshbypass_ebpf::loader::DEFAULT_SOCKET_CAPACITY
                },
            }
        );
        let c = parse("uninstall --cleanup").unwrap();
        let Command::Uninstall { dirs, cleanup } = c.command else {
            panic!("not uninstall: {:?}", c.command)
        };
        assert!(cleanup);
        assert_eq!(dirs.cni_bin_dir, PathBuf::from(DEFAULT_CNI_BIN_DIR));
        let c = parse("run --listen 127.0.0.1:0 --gc-interval 5s --no-selftest --bpf-root /sys/fs/bpf/t")
            .unwrap();
        let Command::Run(opts) = c.command else {
            panic!("not run: {:?}", c.command)
        };
        assert_eq!(opts.listen, "127.0.0.1:0");
        assert_eq!(opts.gc_interval, Duration::from_secs(5));
        assert!(!opts.selftest.wanted());
        assert_eq!(c.bpf_root, PathBuf::from("/sys/fs/bpf/t"));
        assert_eq!(opts.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(opts.token_file, PathBuf::from(DEFAULT_TOKEN_FILE));
        assert_eq!(opts.daemonset, DEFAULT_DAEMONSET);
        assert_eq!(opts.gc_interval, Duration::from_secs(5));
        let c = parse("run --daemonset mb-node --gc-interval=7").unwrap();
        let Command::Run(opts) = c.command else {
            panic!("not run: {:?}", c.command)
        };
        assert_eq!(opts.daemonset, "mb-node");
        assert_eq!(opts.gc_interval, Duration::from_secs(7));
    }
}
