//! Attaching the sockops program to a pod's cgroup (v2) with a bpf_link
//! pinned per container: the attachment outlives the process that made it,
//! and removing the pin detaches it.

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use crate::{
    maps::NodeMaps,
    pins,
    sys::{self, SyscallError, bpf_attach_type::BPF_CGROUP_SOCK_OPS},
};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("invalid link name {name:?}: use 1-200 characters of [A-Za-z0-9_.-], not starting with '.'")]
    InvalidName { name: String },
    #[error("cannot open cgroup directory {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach the sockops program to {}", path.display())]
    Attach {
        path: PathBuf,
        #[source]
        source: SyscallError,
    },
    #[error("cannot pin link {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: SyscallError,
    },
    #[error("cannot read which program {} runs", path.display())]
    Query {
        path: PathBuf,
        #[source]
        source: SyscallError,
    },
    #[error("cannot remove link {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether the attachment was made now or found in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attached {
    Created,
    Existing,
}

/// Link names become pin file names: no traversal, no hidden files.
pub fn valid_link_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl NodeMaps {
    /// Attaches the bypass to `cgroup_dir` (a cgroup v2 directory) under the
    /// link name `name` (the container ID). Idempotent per name.
    pub fn attach_cgroup(&self, cgroup_dir: &Path, name: &str) -> Result<Attached, AttachError> {
        if !valid_link_name(name) {
            return Err(AttachError::InvalidName { name: name.into() });
        }
        let pin = self.pins.link(name);
        if pin.exists() {
            return Ok(Attached::Existing);
        }
        let cgroup = File::open(cgroup_dir).map_err(|source| AttachError::Cgroup {
            path: cgroup_dir.into(),
            source,
        })?;
        // Raw bpf(2) here, not aya's SockOps::attach: aya probes kernel
        // features on first use (a dozen program and BTF loads, ~1.5 ms),
        // which every pod start would pay. A bpf_link on a cgroup coexists
        // with other programs there (a CNI's own), as BPF_F_ALLOW_MULTI.
        let attach_err = |source| AttachError::Attach {
            path: cgroup_dir.into(),
            source,
        };
        let prog_pin = self.pins.prog(pins::PROG_SOCKOPS);
        let prog = sys::obj_get(&prog_pin).map_err(attach_err)?;
        let link = sys::link_create(prog.as_fd(), cgroup.as_fd(), BPF_CGROUP_SOCK_OPS).map_err(attach_err)?;
        sys::obj_pin(link.as_fd(), &pin).map_err(|source| AttachError::Pin {
            path: pin.clone(),
            source,
        })?;
        // An upgrade may have replaced the program since we opened it: it
        // renames the new pin in first, then updates the links it finds, so
        // a link pinned after its listing must follow by itself.
        if let Ok(cur) = sys::obj_get(&prog_pin)
            && let (Ok(a), Ok(b)) = (sys::prog_id(prog.as_fd()), sys::prog_id(cur.as_fd()))
            && a != b
            && let Err(e) = sys::link_update(link.as_fd(), cur.as_fd())
        {
            log::warn!("{}: keeps the previous program: {e}", pin.display());
        }
        Ok(Attached::Created)
    }

    /// The kernel ID of the pinned program `name` (`pins::PROG_*`).
    pub fn program_id(&self, name: &str) -> Result<u32, AttachError> {
        query(self.pins.prog(name), sys::prog_id)
    }

    /// The kernel ID of the program the pod link `name` runs.
    pub fn link_program_id(&self, name: &str) -> Result<u32, AttachError> {
        if !valid_link_name(name) {
            return Err(AttachError::InvalidName { name: name.into() });
        }
        query(self.pins.link(name), sys::link_prog_id)
    }

    /// Detaches the link named `name`; `false` when there was none.
    pub fn detach_cgroup(&self, name: &str) -> Result<bool, AttachError> {
        if !valid_link_name(name) {
            return Err(AttachError::InvalidName { name: name.into() });
        }
        let pin = self.pins.link(name);
        match fs::remove_file(&pin) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(AttachError::Remove { path: pin, source }),
        }
    }

    /// The names of the pinned links.
    pub fn links(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.pins.links_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

/// `id` of the object pinned at `path`.
fn query(path: PathBuf, id: fn(BorrowedFd<'_>) -> Result<u32, SyscallError>) -> Result<u32, AttachError> {
    sys::obj_get(&path)
        .and_then(|object| id(object.as_fd()))
        .map_err(|source| AttachError::Query { path, source })
}

#[cfg(test)]
mod tests {
    use super::valid_link_name;

    #[test]
    fn link_names_cannot_traverse() {
        assert!(valid_link_name("4f1c2d9e0a7b"));
        assert!(valid_link_name("pod-a_1.2"));
        for bad in ["", "..", ".hidden", "a/b", "../x", "a b", "x\0"] {
            assert!(!valid_link_name(bad), "{bad:?} accepted");
        }
        assert!(!valid_link_name(&"a".repeat(201)));
    }
}
