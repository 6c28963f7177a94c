//! The CNI protocol's environment: `CNI_COMMAND` and the attachment parameters, read through
//! [`EnvSource`] so tests pass a map instead of touching the process environment.
//!
//! Which variables are required follows CNI spec 1.1, section 2: ADD and CHECK need
//! `CNI_CONTAINERID`, `CNI_NETNS` and `CNI_IFNAME`; DEL needs `CNI_CONTAINERID` and `CNI_IFNAME`
//! (`CNI_NETNS` may be missing or empty when the sandbox is already gone); VERSION, STATUS and GC
//! need none of them. `CNI_PATH` is never required: this plugin delegates to no other plugin.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::ids::{ContainerId, IdError, IfName, PodUid};

/// Where environment variables come from.
pub trait EnvSource {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment. A value that is not UTF-8 is read lossily; the validation below then
/// rejects it wherever it matters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var_os(key).map(|value| value.to_string_lossy().into_owned())
    }
}

impl EnvSource for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

pub const CNI_COMMAND: &str = "CNI_COMMAND";
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
pub const CNI_NETNS: &str = "CNI_NETNS";
pub const CNI_IFNAME: &str = "CNI_IFNAME";
pub const CNI_ARGS: &str = "CNI_ARGS";
pub const CNI_PATH: &str = "CNI_PATH";

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub const ALL: [Command; 6] = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Version,
        Command::Status,
        Command::Gc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = EnvError;

    fn from_str(value: &str) -> Result<Self, EnvError> {
        Command::ALL
            .into_iter()
            .find(|command| command.as_str() == value)
            .ok_or_else(|| EnvError::UnknownCommand {
                value: value.to_owned(),
            })
    }
}

/// Errors in the CNI environment; all map to CNI error code 4 and name the variable.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(
        "CNI_COMMAND is not set; the container runtime must set it to ADD, DEL, CHECK, VERSION, STATUS or GC"
    )]
    NoCommand,
    #[error("CNI_COMMAND is {value:?}; expected ADD, DEL, CHECK, VERSION, STATUS or GC")]
    UnknownCommand { value: String },
    #[error("{var} is required for {command} but is not set")]
    Missing { var: &'static str, command: Command },
    #[error("{var}={value:?} is not a valid {what}")]
    Invalid {
        var: &'static str,
        value: String,
        what: &'static str,
        #[source]
        problem: IdError,
    },
    #[error("CNI_NETNS={value:?} must be an absolute path to the pod's network namespace")]
    RelativeNetns { value: String },
    #[error("CNI_ARGS entry {entry:?} is not KEY=VALUE")]
    ArgsPair { entry: String },
    #[error(
        "CNI_ARGS has the unknown key {key:?}; add IgnoreUnknown=1 to CNI_ARGS to let plugins skip keys they do not know"
    )]
    ArgsUnknownKey { key: String },
    #[error("CNI_ARGS IgnoreUnknown={value:?} is not a boolean; use 1, true, 0 or false")]
    ArgsIgnoreUnknown { value: String },
}

/// The pod identity from `CNI_ARGS`, as containerd and CRI-O pass it
/// (`IgnoreUnknown=1;K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;K8S_POD_INFRA_CONTAINER_ID=…;K8S_POD_UID=…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ignore_unknown: bool,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<PodUid>,
    pub infra_container_id: Option<ContainerId>,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Empty entries are skipped. Like libcni's `LoadArgs`, a key this plugin
    /// does not know is an error unless `IgnoreUnknown` is true (wherever it appears). Empty
    /// values count as absent.
    pub fn parse(value: &str) -> Result<Self, EnvError> {
        let mut pairs = Vec::new();
        for entry in value.split(';').filter(|entry| !entry.is_empty()) {
            let (key, value) = entry
                .split_once('=')
                .filter(|(key, _)| !key.is_empty())
                .ok_or_else(|| EnvError::ArgsPair {
                    entry: entry.to_owned(),
                })?;
            pairs.push((key, value));
        }

        let mut args = CniArgs::default();
        for (key, value) in &pairs {
            if *key == "IgnoreUnknown" {
                args.ignore_unknown = parse_bool(value).ok_or_else(|| EnvError::ArgsIgnoreUnknown {
                    value: (*value).to_owned(),
                })?;
            }
        }
        for (key, value) in pairs {
            let value = (!value.is_empty()).then_some(value);
            match key {
                "IgnoreUnknown" => {}
                "K8S_POD_NAMESPACE" => args.pod_namespace = value.map(str::to_owned),
                "K8S_POD_NAME" => args.pod_name = value.map(str::to_owned),
                "K8S_POD_UID" => {
                    args.pod_uid = value
                        .map(|v| invalid(PodUid::parse(v), "CNI_ARGS K8S_POD_UID", v, "pod uid"))
                        .transpose()?;
                }
                "K8S_POD_INFRA_CONTAINER_ID" => {
                    args.infra_container_id = value
                        .map(|v| {
                            invalid(
                                ContainerId::parse(v),
                                "CNI_ARGS K8S_POD_INFRA_CONTAINER_ID",
                                v,
                                "container id",
                            )
                        })
                        .transpose()?;
                }
                _ if args.ignore_unknown => {}
                _ => {
                    return Err(EnvError::ArgsUnknownKey { key: key.to_owned() });
                }
            }
        }
        Ok(args)
    }
}

/// The booleans libcni's `UnmarshallableBool` accepts.
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn invalid<T>(
    parsed: Result<T, IdError>,
    var: &'static str,
    value: &str,
    what: &'static str,
) -> Result<T, EnvError> {
    parsed.map_err(|problem| EnvError::Invalid {
        var,
        value: value.to_owned(),
        what,
        problem,
    })
}

/// The attachment an ADD, CHECK or DEL is about. `netns` is always present for ADD and CHECK;
/// for DEL it is `None` when the runtime passed none (the sandbox may be gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: ContainerId,
    pub ifname: IfName,
    pub netns: Option<PathBuf>,
    pub args: CniArgs,
}

/// A validated CNI invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    /// Present for ADD, CHECK and DEL.
    pub attachment: Option<Attachment>,
    /// `CNI_PATH`, split on `:`; empty when unset.
    pub cni_path: Vec<PathBuf>,
}

impl Env {
    pub fn read(source: &impl EnvSource) -> Result<Self, EnvError> {
        let command: Command = source.get(CNI_COMMAND).ok_or(EnvError::NoCommand)?.parse()?;
        let cni_path = source
            .get(CNI_PATH)
            .map(|path| {
                path.split(':')
                    .filter(|dir| !dir.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        let attachment = match command {
            Command::Add | Command::Check | Command::Del => Some(read_attachment(source, command)?),
            Command::Version | Command::Status | Command::Gc => None,
        };
        Ok(Env {
            command,
            attachment,
            cni_path,
        })
    }
}

/// Reads a variable, treating an empty value as unset (runtimes pass `CNI_NETNS=` on DEL).
fn non_empty(source: &impl EnvSource, var: &str) -> Option<String> {
    source.get(var).filter(|value| !value.is_empty())
}

fn required(source: &impl EnvSource, var: &'static str, command: Command) -> Result<String, EnvError> {
    non_empty(source, var).ok_or(EnvError::Missing { var, command })
}

fn read_attachment(source: &impl EnvSource, command: Command) -> Result<Attachment, EnvError> {
    let container_id = required(source, CNI_CONTAINERID, command)?;
    let container_id = invalid(
        ContainerId::parse(&container_id),
        CNI_CONTAINERID,
        &container_id,
        "container id",
    )?;
    let ifname = required(source, CNI_IFNAME, command)?;
    let ifname = invalid(IfName::parse(&ifname), CNI_IFNAME, &ifname, "interface name")?;
    let netns = match command {
        Command::Del => non_empty(source, CNI_NETNS),
        _ => Some(required(source, CNI_NETNS, command)?),
    };
    let netns = netns
        .map(|value| {
            if value.starts_with('/') {
                Ok(PathBuf::from(value))
            } else {
                Err(EnvError::RelativeNetns { value })
            }
        })
        .transpose()?;
    let args = CniArgs::parse(&non_empty(source, CNI_ARGS).unwrap_or_default())?;
    Ok(Attachment {
        container_id,
        ifname,
        netns,
        args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINERD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
        K8S_POD_INFRA_CONTAINER_ID=4f2d9c1e8b7a;K8S_POD_UID=0b7e8a4c-1d2f-4e5a-9b3c-123456789abc";

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn add_env(command: &str) -> HashMap<String, String> {
        env(&[
            (CNI_COMMAND, command),
            (CNI_CONTAINERID, "4f2d9c1e8b7a"),
            (CNI_NETNS, "/var/run/netns/cni-1234"),
            (CNI_IFNAME, "eth0"),
            (CNI_ARGS, CONTAINERD_ARGS),
            (CNI_PATH, "/opt/cni/bin:/usr/lib/cni"),
        ])
    }

    #[test]
    fn add_reads_every_parameter() {
        let env = Env::read(&add_env("ADD")).expect("a complete ADD environment is valid");
        assert_eq!(env.command, Command::Add);
        assert_eq!(
            env.cni_path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        let attachment = env.attachment.expect("ADD has an attachment");
        assert_eq!(attachment.container_id.as_str(), "4f2d9c1e8b7a");
        assert_eq!(attachment.ifname.as_str(), "eth0");
        assert_eq!(attachment.netns, Some(PathBuf::from("/var/run/netns/cni-1234")));
        let args = attachment.args;
        assert!(args.ignore_unknown);
        assert_eq!(args.pod_namespace.as_deref(), Some("default"));
        assert_eq!(args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(
            args.pod_uid.as_ref().map(PodUid::as_str),
            Some("0b7e8a4c-1d2f-4e5a-9b3c-123456789abc")
        );
        assert_eq!(
            args.infra_container_id.as_ref().map(ContainerId::as_str),
            Some("4f2d9c1e8b7a")
        );
    }

    #[test]
    fn add_and_check_require_netns_containerid_and_ifname() {
        for command in ["ADD", "CHECK"] {
            for var in [CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME] {
                let mut vars = add_env(command);
                vars.remove(var);
                match Env::read(&vars) {
                    Err(EnvError::Missing { var: missing, .. }) => assert_eq!(missing, var),
                    other => panic!("{command} without {var} should fail, got {other:?}"),
                }
                vars.insert(var.to_owned(), String::new());
                assert!(
                    matches!(Env::read(&vars), Err(EnvError::Missing { .. })),
                    "{command} with an empty {var} should fail"
                );
            }
        }
    }

    #[test]
    fn del_tolerates_a_missing_or_empty_netns() {
        let mut vars = add_env("DEL");
        vars.insert(CNI_NETNS.to_owned(), String::new());
        let env = Env::read(&vars).expect("DEL with an empty CNI_NETNS is valid");
        assert_eq!(env.attachment.expect("DEL has an attachment").netns, None);
        vars.remove(CNI_NETNS);
        Env::read(&vars).expect("DEL without CNI_NETNS is valid");
        for var in [CNI_CONTAINERID, CNI_IFNAME] {
            let mut vars = add_env("DEL");
            vars.remove(var);
            assert!(
                matches!(Env::read(&vars), Err(EnvError::Missing { var: v, command: Command::Del }) if v == var),
                "DEL without {var} should fail"
            );
        }
    }

    #[test]
    fn version_status_and_gc_need_nothing_else() {
        for command in ["VERSION", "STATUS", "GC"] {
            let env = Env::read(&env(&[(CNI_COMMAND, command)]))
                .unwrap_or_else(|e| panic!("{command} alone should be valid: {e}"));
            assert_eq!(env.attachment, None);
            assert!(env.cni_path.is_empty());
        }
        // Garbage in variables these commands do not use is not their concern.
        let env = Env::read(&env(&[
            (CNI_COMMAND, "VERSION"),
            (CNI_CONTAINERID, "../x"),
            (CNI_ARGS, "garbage"),
        ]))
        .expect("VERSION ignores attachment variables");
        assert_eq!(env.command, Command::Version);
    }

    #[test]
    fn command_must_be_known() {
        assert!(matches!(Env::read(&env(&[])), Err(EnvError::NoCommand)));
        match Env::read(&env(&[(CNI_COMMAND, "add")])) {
            Err(EnvError::UnknownCommand { value }) => assert_eq!(value, "add"),
            other => panic!("lowercase add should be rejected, got {other:?}"),
        }
        for command in Command::ALL {
            assert_eq!(command.as_str().parse::<Command>().expect("round trip"), command);
        }
    }

    #[test]
    fn identifiers_reaching_paths_are_validated() {
        for (var, value) in [
            (CNI_CONTAINERID, "../../etc"),
            (CNI_CONTAINERID, "abc/def"),
            (CNI_IFNAME, ".."),
            (CNI_IFNAME, "eth0/x"),
            (CNI_IFNAME, "averylonginterfacename"),
        ] {
            let mut vars = add_env("ADD");
            vars.insert(var.to_owned(), value.to_owned());
            match Env::read(&vars) {
                Err(err @ EnvError::Invalid { var: v, .. }) => {
                    assert_eq!(v, var);
                    assert!(err.to_string().contains(var), "message names {var}: {err}");
                }
                other => panic!("{var}={value:?} should be rejected, got {other:?}"),
            }
        }
        let mut vars = add_env("ADD");
        vars.insert(CNI_NETNS.to_owned(), "netns/cni-1".to_owned());
        assert!(matches!(Env::read(&vars), Err(EnvError::RelativeNetns { .. })));
    }

    #[test]
    fn pod_uid_with_traversal_is_rejected() {
        let err = CniArgs::parse("K8S_POD_UID=../../../sys").expect_err("traversal is rejected");
        assert!(
            matches!(
                err,
                EnvError::Invalid {
                    var: "CNI_ARGS K8S_POD_UID",
                    ..
                }
            ),
            "unexpected error {err:?}"
        );
        let err = CniArgs::parse("IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=/x")
            .expect_err("bad infra id is rejected");
        assert!(
            matches!(err, EnvError::Invalid { .. }),
            "unexpected error {err:?}"
        );
    }

    #[test]
    fn cni_args_unknown_keys_need_ignore_unknown() {
        match CniArgs::parse("K8S_POD_NAME=a;FOO=bar") {
            Err(EnvError::ArgsUnknownKey { key }) => assert_eq!(key, "FOO"),
            other => panic!("unknown key without IgnoreUnknown should fail, got {other:?}"),
        }
        // IgnoreUnknown applies wherever it appears.
        let args = CniArgs::parse("FOO=bar;K8S_POD_NAME=a;IgnoreUnknown=true")
            .expect("IgnoreUnknown=true skips FOO");
        assert_eq!(args.pod_name.as_deref(), Some("a"));
        assert!(matches!(
            CniArgs::parse("FOO=bar;IgnoreUnknown=0"),
            Err(EnvError::ArgsUnknownKey { .. })
        ));
        assert!(matches!(
            CniArgs::parse("IgnoreUnknown=yes"),
            Err(EnvError::ArgsIgnoreUnknown { .. })
        ));
    }

    #[test]
    fn cni_args_syntax() {
        assert_eq!(CniArgs::parse("").expect("empty args"), CniArgs::default());
        let args =
            CniArgs::parse(";K8S_POD_NAMESPACE=ns;;K8S_POD_NAME=;").expect("empty entries are skipped");
        assert_eq!(args.pod_namespace.as_deref(), Some("ns"));
        assert_eq!(args.pod_name, None, "an empty value is absent");
        for bad in ["K8S_POD_NAME", "=x"] {
            assert!(
                matches!(CniArgs::parse(bad), Err(EnvError::ArgsPair { .. })),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn process_env_reads_without_mutation() {
        // PATH is set in every test environment; nothing is written.
        assert!(ProcessEnv.get("PATH").is_some());
        assert_eq!(ProcessEnv.get("MESHBYPASS_SURELY_UNSET_VARIABLE"), None);
    }
}
