//! Belt and braces beside CNI GC: the plugin records what ADD did in one
//! JSON file per container under `stateDir`; a record whose network
//! namespace is gone belongs to a pod whose DEL never came (runtime crash,
//! node reboot with a persistent state dir, a DEL that failed). Its link is
//! detached, its pod unregistered by netns cookie, and the record removed.
//!
//! "Gone" is decided conservatively: the netns path must be absent while its
//! directory (`/var/run/netns`) is visible to us, so a missing hostPath mount
//! never makes every pod look dead. `/proc/<pid>/ns/net` paths are skipped:
//! from a container, the host's /proc may not be the one we see.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use meshbypass_ebpf::{
    NodeMaps,
    attach::{AttachError, valid_link_name},
    chain::error_chain,
    pods::PodError,
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("cannot list the state dir {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot detach the link of container {id}")]
    Detach {
        id: String,
        #[source]
        source: AttachError,
    },
    #[error("cannot unregister the pod of netns cookie {cookie}")]
    Unregister {
        cookie: u64,
        #[source]
        source: PodError,
    },
}

/// The fields of the plugin's record (cni-plugin/src/state.rs) that GC
/// needs; the others are the plugin's business and are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    container_id: String,
    netns: Option<PathBuf>,
    netns_cookie: Option<u64>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub scanned: usize,
    pub removed: Vec<String>,
    pub errors: usize,
}

/// Whether a record's netns is known to be gone.
pub fn netns_gone(path: &Path) -> bool {
    if !path.is_absolute() || path.starts_with("/proc") {
        return false;
    }
    match (path.parent(), path.symlink_metadata()) {
        (Some(dir), Err(e)) if e.kind() == io::ErrorKind::NotFound => dir.is_dir(),
        _ => false,
    }
}

/// One pass over `state_dir`.
pub fn collect(state_dir: &Path, node: &mut NodeMaps) -> Result<GcReport, GcError> {
    let mut report = GcReport::default();
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(source) => {
            return Err(GcError::List {
                path: state_dir.into(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !name.ends_with(".json") {
            continue; // the plugin's temp files, anything else
        }
        report.scanned += 1;
        let path = entry.path();
        let record: Record = match fs::read(&path).map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                log::warn!("gc: {} is not a state record ({e}); left alone", path.display());
                continue;
            }
            // DEL removed it meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                log::warn!("gc: cannot read {}: {e}", path.display());
                report.errors += 1;
                continue;
            }
        };
        let Some(netns) = &record.netns else { continue };
        if !netns_gone(netns) {
            continue;
        }
        match release(node, &record) {
            Ok(()) => match fs::remove_file(&path) {
                Ok(()) => report.removed.push(record.container_id),
                Err(e) if e.kind() == io::ErrorKind::NotFound => report.removed.push(record.container_id),
                Err(e) => {
                    log::warn!("gc: cannot remove {}: {e}", path.display());
                    report.errors += 1;
                }
            },
            Err(e) => {
                log::warn!("gc: {}", error_chain(&e));
                report.errors += 1;
            }
        }
    }
    Ok(report)
}

fn release(node: &mut NodeMaps, record: &Record) -> Result<(), GcError> {
    if valid_link_name(&record.container_id) {
        node.detach_cgroup(&record.container_id)
            .map_err(|source| GcError::Detach {
                id: record.container_id.clone(),
                source,
            })?;
    }
    if let Some(cookie) = record.netns_cookie {
        node.unregister_pod(cookie)
            .map_err(|source| GcError::Unregister { cookie, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_only_when_the_directory_is_visible() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let present = tmp.path().join("cni-1");
        fs::write(&present, b"").expect("creating a fake netns file");
        assert!(!netns_gone(&present), "an existing netns counted as gone");
        assert!(
            netns_gone(&tmp.path().join("cni-2")),
            "a missing netns not counted as gone"
        );
        assert!(
            !netns_gone(&tmp.path().join("nodir/cni-3")),
            "an invisible directory counted as gone"
        );
        assert!(
            !netns_gone(Path::new("/proc/999999999/ns/net")),
            "/proc paths are skipped"
        );
        assert!(
            !netns_gone(Path::new("relative/ns")),
            "relative paths are skipped"
        );
    }
}
