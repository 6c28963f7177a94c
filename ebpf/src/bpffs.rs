//! The bpf filesystem under the bpf root: mounted when missing, directories
//! made 0700, and the exclusive lock that makes one process the creator.

use std::{
    fs::{self, DirBuilder, File},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{Flock, FlockArg},
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot mount a bpf filesystem at {}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{} is not on a bpf filesystem and none can be mounted there: mount one (mount -t bpf bpf /sys/fs/bpf) or choose another bpf root", path.display())]
    NotBpffs { path: PathBuf },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure `root` exists on a bpf filesystem, mounting one when needed:
/// on the root's parent when that is an empty mount point such as
/// `/sys/fs/bpf`, else on the root itself.
pub fn ensure_root(root: &Path) -> Result<(), BpffsError> {
    if root.is_dir() && is_bpffs(root) {
        return Ok(());
    }
    let parent = root.parent().unwrap_or(Path::new("/"));
    if parent.is_dir() && !is_bpffs(parent) && !root.exists() {
        // /sys/fs/bpf is a sysfs directory meant to carry the mount.
        if parent == Path::new("/sys/fs/bpf") {
            mount_bpffs(parent)?;
        }
    }
    if !root.exists() {
        mkdir_0700(root)?;
    }
    if !is_bpffs(root) {
        // A plain directory elsewhere (tests, custom roots): mount on it.
        mount_bpffs(root)?;
    }
    if !is_bpffs(root) {
        return Err(BpffsError::NotBpffs { path: root.into() });
    }
    Ok(())
}

fn mount_bpffs(path: &Path) -> Result<(), BpffsError> {
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|source| BpffsError::Mount {
        path: path.into(),
        source,
    })
}

/// `mkdir -p` with 0700 for what it creates.
pub fn mkdir_0700(path: &Path) -> Result<(), BpffsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| BpffsError::Create {
            path: path.into(),
            source,
        })
}

/// An exclusive lock on the bpf root directory, held while pins are created
/// or removed. Released on drop.
pub struct RootLock {
    _lock: Flock<File>,
}

impl RootLock {
    pub fn acquire(root: &Path) -> Result<Self, BpffsError> {
        loop {
            let dir = File::open(root).map_err(|source| BpffsError::Create {
                path: root.into(),
                source,
            })?;
            let lock = Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, source)| BpffsError::Lock {
                path: root.into(),
                source,
            })?;
            // An unload may have removed the directory while we waited.
            let same = match (fs::metadata(root), nix::sys::stat::fstat(lock.as_raw_fd())) {
                (Ok(path_md), Ok(fd_md)) => path_md.ino() == fd_md.st_ino,
                _ => false,
            };
            if same {
                return Ok(Self { _lock: lock });
            }
            mkdir_0700(root)?;
        }
    }
}
