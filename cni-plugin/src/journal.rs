//! The decision log: one JSON line per ADD and DEL under
//! `<stateDir>/log/`, saying which pod, what was decided (meshed, redirect
//! only, not meshed, removed, failed), why (the request's log messages) and
//! how long it took (a request whose configuration does not parse has no
//! `stateDir`, and no line: the CNI error is its record). `meshbypass-node run` follows it, re-emits each line on
//! its stdout (so `kubectl logs ds/meshbypass-node` shows every ADD's
//! decision) and counts requests and their latency for `/metrics`.
//!
//! Bounded: the file is renamed to `cni.jsonl.1` (replacing the previous
//! one) before it would pass [`MAX_BYTES`], so the log takes at most twice
//! that. Parallel plugin processes append under an exclusive `flock` on the
//! directory, one `write` per line.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{
    config::NetConf,
    env::{Command, Env},
    error::CniError,
    ids::ContainerId,
    state::StateDir,
};

/// The directory under `stateDir`.
pub const DIR: &str = "log";
/// The current file; the previous one is `cni.jsonl.1`.
pub const FILE: &str = "cni.jsonl";
pub const ROTATED: &str = "cni.jsonl.1";
/// Rotation threshold of the current file.
pub const MAX_BYTES: u64 = 1 << 20;
/// Log messages kept per request, and bytes kept per message.
pub const MAX_MESSAGES: usize = 16;
pub const MAX_MESSAGE_BYTES: usize = 512;

/// What a request did for its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// ADD: the sidecar redirect and the bypass.
    Meshed,
    /// ADD: the sidecar redirect; the bypass was skipped (the log says why)
    /// or `acceleration` is `off`.
    RedirectOnly,
    /// ADD: the pod is not meshed (the log says why); nothing was done.
    NotMeshed,
    /// DEL: everything of the pod's is gone.
    Removed,
    /// The request failed (`code`, `error`).
    Failed,
}

impl Decision {
    pub const ALL: [Decision; 5] = [
        Self::Meshed,
        Self::RedirectOnly,
        Self::NotMeshed,
        Self::Removed,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Meshed => "meshed",
            Self::RedirectOnly => "redirect-only",
            Self::NotMeshed => "not-meshed",
            Self::Removed => "removed",
            Self::Failed => "failed",
        }
    }

    /// Whether a request of `command` ends this way.
    pub fn possible(self, command: &str) -> bool {
        match self {
            Self::Meshed | Self::RedirectOnly | Self::NotMeshed => command == "ADD",
            Self::Removed => command == "DEL",
            Self::Failed => true,
        }
    }
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// When the request ended, in seconds since the epoch.
    pub ts: f64,
    /// `ADD` or `DEL`.
    pub command: String,
    /// The request's `cniVersion`.
    pub cni_version: String,
    pub container_id: Option<String>,
    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME`.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub decision: Decision,
    /// The pod's acceleration mode when the bypass is attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceleration: Option<String>,
    /// The CNI error code and message of a failed request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The request's log messages at `info` and above, whatever `logLevel`
    /// says: why the pod was or was not meshed, why the bypass was skipped.
    #[serde(default)]
    pub log: Vec<String>,
    pub duration_ms: f64,
}

/// The request being logged; filled in as the request is read.
#[derive(Debug, Default)]
pub struct Journal {
    request: Option<Request>,
}

#[derive(Debug)]
struct Request {
    command: Command,
    cni_version: String,
    state_dir: PathBuf,
    container_id: Option<ContainerId>,
    namespace: Option<String>,
    pod: Option<String>,
}

impl Journal {
    /// The request's command and pod, once its configuration (`stateDir`)
    /// is known; only ADD and DEL are logged.
    pub fn begin(&mut self, env: &Env, config: &NetConf) {
        if !matches!(env.command, Command::Add | Command::Del) {
            return;
        }
        let att = env.attachment.as_ref();
        self.request = Some(Request {
            command: env.command,
            cni_version: config.cni_version.clone(),
            state_dir: config.state_dir.clone(),
            container_id: att.map(|a| a.container_id.clone()),
            namespace: att.and_then(|a| a.args.pod_namespace.clone()),
            pod: att.and_then(|a| a.args.pod_name.clone()),
        });
    }

    /// Appends the request's line; a log that cannot be written never
    /// fails the request (a warning on the plugin's own log says why).
    pub fn finish(self, error: Option<&CniError>, took: Duration, log: Vec<String>) {
        let Some(r) = self.request else { return };
        let (decision, acceleration) = match (error, r.command) {
            (Some(_), _) => (Decision::Failed, None),
            (None, Command::Del) => (Decision::Removed, None),
            // The record is written only for a meshed pod, and says whether
            // the bypass is attached.
            (None, _) => match r
                .container_id
                .as_ref()
                .map(|id| StateDir::new(&r.state_dir).load(id))
            {
                Some(Ok(Some(record))) => match record.mode {
                    Some(mode) => (Decision::Meshed, Some(mode.as_str().to_owned())),
                    None => (Decision::RedirectOnly, None),
                },
                _ => (Decision::NotMeshed, None),
            },
        };
        let entry = Entry {
            ts: now(),
            command: r.command.as_str().to_owned(),
            cni_version: r.cni_version,
            container_id: r.container_id.map(|id| id.as_str().to_owned()),
            namespace: r.namespace,
            pod: r.pod,
            decision,
            acceleration,
            code: error.map(CniError::code),
            error: error.map(|e| {
                let r = e.reply("");
                if r.details.is_empty() {
                    r.msg
                } else {
                    format!("{}: {}", r.msg, r.details)
                }
            }),
            log,
            duration_ms: (took.as_secs_f64() * 1e6).round() / 1e3,
        };
        let dir = r.state_dir.join(DIR);
        if let Err(e) = append(&dir, &entry) {
            log::warn!("cannot write the decision log in {}: {e}", dir.display());
        }
    }
}

/// Seconds since the epoch, to the millisecond.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64 / 1e3)
}

/// Appends `entry` to `dir/cni.jsonl`, rotating first when it would pass
/// [`MAX_BYTES`].
pub fn append(dir: &Path, entry: &Entry) -> io::Result<()> {
    let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
    line.push(b'\n');
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let _lock =
        Flock::lock(File::open(dir)?, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
    let path = dir.join(FILE);
    match fs::metadata(&path) {
        Ok(m) if m.len() > 0 && m.len() + line.len() as u64 > MAX_BYTES => {
            fs::rename(&path, dir.join(ROTATED))?;
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)?
        .write_all(&line)
}

/// `msg` cut to at most [`MAX_MESSAGE_BYTES`] (at a character boundary).
pub fn clip(msg: &str) -> String {
    if msg.len() <= MAX_MESSAGE_BYTES {
        return msg.to_owned();
    }
    let mut end = MAX_MESSAGE_BYTES - "…".len();
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &msg[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> Entry {
        Entry {
            ts: 1.5,
            command: "ADD".into(),
            cni_version: "1.1.0".into(),
            container_id: Some(format!("c{n:06}")),
            namespace: Some("default".into()),
            pod: Some(format!("web-{n:06}")),
            decision: Decision::NotMeshed,
            acceleration: None,
            code: None,
            error: None,
            log: vec!["x".repeat(400)],
            duration_ms: 1.25,
        }
    }

    fn lines(path: &Path) -> Vec<Entry> {
        match fs::read_to_string(path) {
            Ok(s) => s
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }

    #[test]
    fn lines_round_trip_with_the_agreed_field_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = entry(1);
        e.decision = Decision::Meshed;
        e.acceleration = Some("proxy-only".into());
        append(dir.path(), &e).unwrap();
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["decision"], "meshed");
        assert_eq!(v["containerId"], "c000001");
        assert_eq!(v["durationMs"], 1.25);
        assert_eq!(v["acceleration"], "proxy-only");
        assert!(v.get("error").is_none(), "{v}");
        assert_eq!(lines(&dir.path().join(FILE)), vec![e]);
    }

    #[test]
    fn the_log_is_bounded_by_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let line_len = serde_json::to_vec(&entry(0)).unwrap().len() as u64 + 1;
        let per_file = MAX_BYTES / line_len;
        let total = 2 * per_file + 7;
        for n in 0..total as usize {
            append(dir.path(), &entry(n)).unwrap();
        }
        let (cur, old) = (lines(&dir.path().join(FILE)), lines(&dir.path().join(ROTATED)));
        for f in [FILE, ROTATED] {
            let len = fs::metadata(dir.path().join(f)).unwrap().len();
            assert!(len <= MAX_BYTES, "{f} is {len} bytes");
        }
        // The newest lines survive, in order, without a gap.
        assert_eq!(old.len() as u64, per_file);
        assert_eq!(cur.len() as u64, total - 2 * per_file);
        let names: Vec<_> = old.iter().chain(&cur).map(|e| e.pod.clone().unwrap()).collect();
        let want: Vec<_> = (total - old.len() as u64 - cur.len() as u64..total)
            .map(|n| format!("web-{n:06}"))
            .collect();
        assert_eq!(names, want);
    }

    #[test]
    fn parallel_writers_lose_no_line() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let dir = dir.path();
                s.spawn(move || {
                    for n in 0..50 {
                        append(dir, &entry(t * 1000 + n)).unwrap();
                    }
                });
            }
        });
        let mut got: Vec<_> = lines(&dir.path().join(FILE))
            .into_iter()
            .map(|e| e.container_id.unwrap())
            .collect();
        got.sort();
        let mut want: Vec<_> = (0..4)
            .flat_map(|t| (0..50).map(move |n| format!("c{:06}", t * 1000 + n)))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn messages_are_clipped_at_a_char_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let c = clip(&long);
        assert!(c.len() <= MAX_MESSAGE_BYTES, "{}", c.len());
        assert!(c.ends_with('…'));
    }

    #[test]
    fn decisions_belong_to_their_commands() {
        let add: Vec<_> = Decision::ALL.into_iter().filter(|d| d.possible("ADD")).collect();
        assert_eq!(
            add,
            [
                Decision::Meshed,
                Decision::RedirectOnly,
                Decision::NotMeshed,
                Decision::Failed
            ]
        );
        let del: Vec<_> = Decision::ALL.into_iter().filter(|d| d.possible("DEL")).collect();
        assert_eq!(del, [Decision::Removed, Decision::Failed]);
        for d in Decision::ALL {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
    }
}
