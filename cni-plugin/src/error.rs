//! The plugin's error as the CNI runtime sees it: each variant carries the spec's error code, and
//! [`CniError::reply`] builds the spec's error JSON (`cniVersion`, `code`, `msg`, `details`).
//!
//! `msg` is the top-level message (what failed and what to fix); `details` is the chain of causes
//! below it, joined with ": ".

use std::error::Error as StdError;
use std::path::PathBuf;

use meshbypass_ebpf::chain::error_chain;
use serde::{Deserialize, Serialize};

use crate::cidr::Family;
use crate::config::ConfigError;
use crate::env::{Command, EnvError};
use crate::version;

/// A boxed cause from a layer that has its own error type (netns, iptables runner, bpf loader).
pub type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// CNI spec 1.1 error codes (section 5, "Error") and ours from 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const IPTABLES: u32 = 100;
    pub const NETNS: u32 = 101;
    pub const BPF: u32 = 102;
    pub const INTERNAL: u32 = 103;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// 1: the request's `cniVersion` is not one we speak.
    #[error("cniVersion {requested:?} is not supported; use one of {}", version::SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion { requested: String },
    /// 1: a command the request's version does not define (CHECK before 0.4.0, STATUS and GC
    /// before 1.1.0); libcni's `skel` answers these with the same code.
    #[error(
        "{command} is not defined in CNI {version} (it came with {since}); a runtime must not send it \
         for this network, or the conflist must declare cniVersion {since} or later"
    )]
    CommandNotInVersion {
        command: Command,
        version: String,
        since: &'static str,
    },
    /// 2: a field we understand but cannot honour; the spec wants key and value in the message.
    #[error("{field}={value} is not supported: {fix}")]
    UnsupportedField {
        field: String,
        value: String,
        fix: &'static str,
    },
    /// 4: CNI_* variables.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// 6 (undecodable stdin), 1 (unsupported cniVersion) or 7 (everything else).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// 6: stdin that is not what the command expects (e.g. VERSION's input).
    #[error("cannot decode the {what} on stdin")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// 7: a configuration that is valid alone but not for this request (e.g. ADD without
    /// `prevResult`).
    #[error("{problem}; {fix}")]
    InvalidConfig {
        problem: &'static str,
        fix: &'static str,
    },
    /// 11: a transient condition (a lock held, a map being loaded by another ADD).
    #[error("{what} is busy; the runtime should try again later")]
    TryAgainLater {
        what: &'static str,
        #[source]
        source: Cause,
    },
    /// 50: STATUS, the node cannot serve ADD (no bpffs, no cgroup2, maps unloadable).
    #[error("the plugin cannot serve ADD: {reason}")]
    NotAvailable {
        reason: &'static str,
        #[source]
        source: Option<Cause>,
    },
    /// 100: iptables-restore failed in the pod's netns.
    #[error("cannot {action} the {family} redirect rules in the pod's network namespace")]
    Iptables {
        action: &'static str,
        family: Family,
        #[source]
        source: Cause,
    },
    /// 101: the pod's network namespace cannot be entered or read.
    #[error("cannot use the pod's network namespace {}", netns.display())]
    Netns {
        netns: PathBuf,
        #[source]
        source: Cause,
    },
    /// 102: attaching the bypass or registering the pod in the pinned maps failed.
    #[error("cannot {action}")]
    Bpf {
        action: &'static str,
        #[source]
        source: Cause,
    },
    /// 103: a bug or an impossible state; the message says where.
    #[error("internal error while {action}")]
    Internal {
        action: &'static str,
        #[source]
        source: Cause,
    },
}

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } | CniError::CommandNotInVersion { .. } => {
                code::INCOMPATIBLE_VERSION
            }
            CniError::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            CniError::Env(_) => code::INVALID_ENV,
            CniError::Config(err) if err.is_version() => code::INCOMPATIBLE_VERSION,
            CniError::Config(err) if err.is_decode() => code::DECODE,
            CniError::Config(_) => code::INVALID_CONFIG,
            CniError::Decode { .. } => code::DECODE,
            CniError::InvalidConfig { .. } => code::INVALID_CONFIG,
            CniError::TryAgainLater { .. } => code::TRY_AGAIN_LATER,
            CniError::NotAvailable { .. } => code::NOT_AVAILABLE,
            CniError::Iptables { .. } => code::IPTABLES,
            CniError::Netns { .. } => code::NETNS,
            CniError::Bpf { .. } => code::BPF,
            CniError::Internal { .. } => code::INTERNAL,
        }
    }

    /// The spec's error result, in `cni_version` (the request's, or [`version::NEWEST`] when
    /// it is unknown).
    pub fn reply(&self, cni_version: &str) -> ErrorReply {
        ErrorReply {
            cni_version: cni_version.to_owned(),
            code: self.code(),
            msg: self.to_string(),
            details: self.source().map(error_chain).unwrap_or_default(),
        }
    }
}

/// The JSON a failing plugin prints on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ErrorReply {
    pub fn to_json(&self) -> String {
        // A struct of strings and an integer always serializes.
        serde_json::to_string(self).expect("an ErrorReply always serializes")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io;

    use super::*;
    use crate::config::NetConf;
    use crate::env::Env;

    fn env_error(vars: &[(&str, &str)]) -> CniError {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CniError::from(Env::read(&vars).expect_err("environment is invalid"))
    }

    fn config_error(json: &str) -> CniError {
        CniError::from(NetConf::parse(json.as_bytes()).expect_err("config is invalid"))
    }

    #[test]
    fn codes_follow_the_spec() {
        assert_eq!(env_error(&[]).code(), 4);
        assert_eq!(
            env_error(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "a")]).code(),
            4
        );
        assert_eq!(config_error("{").code(), 6);
        assert_eq!(
            config_error(r#"{"cniVersion":"0.2.0","name":"n","type":"meshbypass"}"#).code(),
            1
        );
        assert_eq!(
            config_error(r#"{"cniVersion":"1.1.0","name":"n","type":"meshbypass","x":1}"#).code(),
            7
        );
        let io_cause = || Box::new(io::Error::other("boom")) as Cause;
        let cases: [(CniError, u32); 10] = [
            (
                CniError::IncompatibleVersion {
                    requested: "9.9.9".into(),
                },
                1,
            ),
            (
                CniError::CommandNotInVersion {
                    command: Command::Check,
                    version: "0.3.1".into(),
                    since: "0.4.0",
                },
                1,
            ),
            (
                CniError::UnsupportedField {
                    field: "redirect.mode".into(),
                    value: "\"TPROXY\"".into(),
                    fix: "only REDIRECT is implemented",
                },
                2,
            ),
            (
                CniError::InvalidConfig {
                    problem: "ADD got no prevResult",
                    fix: "chain meshbypass after a main plugin",
                },
                7,
            ),
            (
                CniError::TryAgainLater {
                    what: "the node's bypass maps",
                    source: io_cause(),
                },
                11,
            ),
            (
                CniError::NotAvailable {
                    reason: "bpffs is not mounted",
                    source: None,
                },
                50,
            ),
            (
                CniError::Iptables {
                    action: "apply",
                    family: Family::V4,
                    source: io_cause(),
                },
                100,
            ),
            (
                CniError::Netns {
                    netns: "/run/netns/x".into(),
                    source: io_cause(),
                },
                101,
            ),
            (
                CniError::Bpf {
                    action: "attach the bypass",
                    source: io_cause(),
                },
                102,
            ),
            (
                CniError::Internal {
                    action: "encoding the result",
                    source: io_cause(),
                },
                103,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn reply_is_the_spec_json() {
        let err =
            config_error(r#"{"cniVersion":"1.0.0","name":"n","type":"meshbypass","redirect":{"bogus":1}}"#);
        let reply = err.reply("1.0.0");
        let json: serde_json::Value = serde_json::from_str(&reply.to_json()).expect("reply is JSON");
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(json["code"], 7);
        let msg = json["msg"].as_str().expect("msg is a string");
        assert!(msg.contains("redirect.bogus"), "msg names the key: {msg}");
        let details = json["details"].as_str().expect("details is a string");
        assert!(details.contains("unknown field"), "details: {details}");
        assert_eq!(
            json.as_object().map(|o| o.len()),
            Some(4),
            "exactly cniVersion, code, msg, details"
        );
    }

    #[test]
    fn details_chain_causes_and_are_omitted_when_empty() {
        let err = CniError::Netns {
            netns: "/run/netns/gone".into(),
            source: Box::new(io::Error::new(io::ErrorKind::NotFound, "no such file")),
        };
        let reply = err.reply(version::NEWEST);
        assert_eq!(
            reply.msg,
            "cannot use the pod's network namespace /run/netns/gone"
        );
        assert_eq!(reply.details, "no such file");
        let bare = CniError::NotAvailable {
            reason: "cgroup2 is not mounted",
            source: None,
        }
        .reply("1.1.0")
        .to_json();
        assert_eq!(
            bare,
            r#"{"cniVersion":"1.1.0","code":50,"msg":"the plugin cannot serve ADD: cgroup2 is not mounted"}"#
        );
    }

    #[test]
    fn env_messages_name_the_variable() {
        let reply = env_error(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0/.."),
        ])
        .reply("1.1.0");
        assert_eq!(reply.code, 4);
        assert!(reply.msg.contains("CNI_IFNAME"), "{}", reply.msg);
        assert!(
            reply.details.contains("'/'"),
            "says what is wrong: {}",
            reply.details
        );
    }
}
