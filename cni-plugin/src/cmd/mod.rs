//! One module per CNI command; `run` reads the request and dispatches.

mod add;
mod check;
mod del;
mod gc;
mod status;

use std::path::Path;

use log::{error, info};

use crate::{
    caps,
    config::NetConf,
    env::{Command, Env, EnvSource},
    error::CniError,
    journal::Journal,
    logging, version,
};

/// What the binary prints on stdout, and its exit code.
pub struct Reply {
    pub stdout: String,
    pub code: i32,
}

/// Runs one CNI request: `stdin` is the network configuration.
/// ADD and DEL also leave a line in the decision log (`journal.rs`).
pub fn run(source: &impl EnvSource, stdin: &[u8]) -> Reply {
    let started = std::time::Instant::now();
    let requested = requested_version(stdin);
    let mut journal = Journal::default();
    let result = dispatch(source, stdin, &mut journal);
    if let Err(e) = &result {
        error!("{e}");
    }
    journal.finish(result.as_ref().err(), started.elapsed(), logging::take_captured());
    match result {
        Ok(stdout) => Reply { stdout, code: 0 },
        Err(e) => Reply {
            stdout: e.reply(&requested).to_json(),
            code: 1,
        },
    }
}

/// The request's cniVersion for error replies, when it is one we speak.
fn requested_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| version::is_supported(v))
        .unwrap_or_else(|| version::NEWEST.to_owned())
}

fn dispatch(source: &impl EnvSource, stdin: &[u8], journal: &mut Journal) -> Result<String, CniError> {
    let env = Env::read(source)?;
    if env.command == Command::Version {
        return Ok(version_reply(stdin));
    }
    let config = NetConf::parse(stdin)?;
    journal.begin(&env, &config);
    let tag = match &env.attachment {
        Some(a) => format!("{} {}", env.command.as_str(), a.container_id.as_str()),
        None => env.command.as_str().to_owned(),
    };
    logging::init(config.log_level.filter(), config.log_file.as_deref(), &tag);
    info!("CNI {} request", config.cni_version);
    if let Some(since) = version::defined_since(env.command)
        && !version::at_least(&config.cni_version, since)
    {
        return Err(CniError::CommandNotInVersion {
            command: env.command,
            version: config.cni_version.clone(),
            since,
        });
    }
    if matches!(env.command, Command::Add | Command::Del | Command::Check) {
        // Before anything is touched: no half-configured pod for want of a capability.
        caps::require()?;
    }
    // Env::read gives ADD, DEL and CHECK their attachment.
    let att = || {
        env.attachment.as_ref().ok_or(CniError::InvalidConfig {
            problem: "ADD, DEL and CHECK need an attachment",
            fix: "set CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME",
        })
    };
    match env.command {
        Command::Add => add::run(att()?, &config),
        Command::Del => del::run(att()?, &config).map(|()| String::new()),
        Command::Check => check::run(att()?, &config).map(|()| String::new()),
        Command::Status => status::run(&config).map(|()| String::new()),
        Command::Gc => gc::run(&config).map(|()| String::new()),
        Command::Version => unreachable!("handled above"),
    }
}

/// VERSION: the versions we speak, in the requested version when we speak it.
fn version_reply(stdin: &[u8]) -> String {
    serde_json::json!({
        "cniVersion": requested_version(stdin),
        "supportedVersions": version::SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// A netns path that no longer exists is a pod already gone.
fn exists(netns: Option<&Path>) -> Option<&Path> {
    netns.filter(|p| p.exists())
}

/// stdin larger than the limit (4 MiB).
pub fn too_large() -> Reply {
    let e = CniError::InvalidConfig {
        problem: "the network configuration on stdin is larger than 4 MiB",
        fix: "pass the plugin's own configuration, not a whole file tree",
    };
    Reply {
        stdout: e.reply(version::NEWEST).to_json(),
        code: 1,
    }
}

/// stdin could not be read.
pub fn unreadable(err: std::io::Error) -> Reply {
    let e = CniError::Internal {
        action: "reading stdin",
        source: Box::new(err),
    };
    Reply {
        stdout: e.reply(version::NEWEST).to_json(),
        code: 1,
    }
}
