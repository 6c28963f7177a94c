//! What ADD did for a container, recorded so DEL and GC can undo it when the
//! netns is already gone: one JSON file per container ID under `stateDir`,
//! written atomically (temp file in the same directory, then rename).

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use meshbypass_ebpf::Mode;
use serde::{Deserialize, Serialize};

use crate::ids::ContainerId;

/// What ADD did for one container (its record), for DEL, CHECK and GC. Not the pod's
/// registration in the node's maps (`meshbypass_ebpf::PodEntry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub ips: Vec<IpAddr>,
    /// iptables families the redirect was written for ("ipv4", "ipv6").
    pub families: Vec<String>,
    /// Set when the bypass was attached and the pod registered.
    pub netns_cookie: Option<u64>,
    pub cgroup: Option<PathBuf>,
    pub mode: Option<Mode>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write the state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state file {} is corrupt; delete it", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, id: &ContainerId) -> PathBuf {
        self.dir.join(format!("{}.json", id.stem()))
    }

    fn tmp_prefix(id: &ContainerId) -> String {
        format!(".{}.tmp-", id.stem())
    }

    pub fn save(&self, state: &PodRecord, id: &ContainerId) -> Result<(), StateError> {
        let path = self.path(id);
        let err = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self
            .dir
            .join(format!(".{}.tmp-{}", id.as_str(), std::process::id()));
        let body = serde_json::to_vec_pretty(state).map_err(|e| err(io::Error::other(e)))?;
        fs::write(&tmp, body).map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)
    }

    pub fn load(&self, id: &ContainerId) -> Result<Option<PodRecord>, StateError> {
        let path = self.path(id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Removes the record, and temp files an ADD killed while writing it
    /// left; absent is fine (DEL runs any number of times).
    pub fn remove(&self, id: &ContainerId) -> Result<(), StateError> {
        let prefix = Self::tmp_prefix(id);
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
                    match fs::remove_file(entry.path()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(StateError::Write {
                                path: entry.path(),
                                source,
                            });
                        }
                    }
                }
            }
        }
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path, source }),
        }
    }

    /// The stems ([`ContainerId::stem`]) of the containers with a record.
    pub fn list(&self) -> Result<Vec<ContainerId>, StateError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut ids = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".json")
                && let Ok(id) = ContainerId::parse(id)
            {
                ids.push(id);
            }
        }
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_lists_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(&dir.path().join("state"));
        let id = ContainerId::parse("abc123").unwrap();
        assert_eq!(sd.load(&id).unwrap(), None);
        let st = PodRecord {
            container_id: "abc123".into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/x".into()),
            pod_namespace: Some("default".into()),
            pod_name: Some("web".into()),
            pod_uid: None,
            ips: vec!["10.0.0.5".parse().unwrap()],
            families: vec!["ipv4".into()],
            netns_cookie: Some(42),
            cgroup: None,
            mode: Some(Mode::Auto),
        };
        sd.save(&st, &id).unwrap();
        assert_eq!(sd.load(&id).unwrap(), Some(st));
        assert_eq!(sd.list().unwrap(), vec![id.clone()]);
        sd.remove(&id).unwrap();
        sd.remove(&id).unwrap();
        assert!(sd.list().unwrap().is_empty());
    }
}
