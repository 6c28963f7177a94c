//! Host files written atomically: the new content goes to a temp file in the
//! target's directory, is fsynced, then renamed over the target, and the
//! directory is fsynced. Readers (the container runtime reading the conf
//! dir, kubelet exec'ing the plugin) see the old file or the new one, never
//! a partial one. Temp names end in `.tmp`, which no CNI loader reads.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

#[derive(Debug, thiserror::Error)]
pub enum AtomicError {
    #[error("{} has no parent directory or file name", path.display())]
    BadPath { path: PathBuf },
    #[error("cannot write the temp file {}", path.display())]
    Temp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {} to {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync the directory {}", path.display())]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A temp file holding the complete new content, not yet visible under the
/// target name. Dropping it without [`Staged::commit`] removes it.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

/// Writes `contents` to a temp file beside `target` with `mode`, fsynced.
pub fn stage(target: &Path, contents: &[u8], mode: u32) -> Result<Staged, AtomicError> {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(AtomicError::BadPath { path: target.into() });
    };
    let tmp = dir.join(format!(
        ".{}.meshbypass-{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut staged = Staged {
        tmp,
        target: target.into(),
        committed: true, // nothing to clean up until the file exists
    };
    let err = |source| AtomicError::Temp {
        path: staged.tmp.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&staged.tmp)
        .map_err(err)?;
    staged.committed = false;
    // The umask may have narrowed the mode.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(staged)
}

impl Staged {
    /// Renames the temp file over the target and syncs the directory.
    pub fn commit(mut self) -> Result<(), AtomicError> {
        fs::rename(&self.tmp, &self.target).map_err(|source| AtomicError::Rename {
            from: self.tmp.clone(),
            to: self.target.clone(),
            source,
        })?;
        self.committed = true;
        let dir = self.target.parent().unwrap_or(Path::new("/"));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| AtomicError::SyncDir {
                path: dir.into(),
                source,
            })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            match fs::remove_file(&self.tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot remove the temp file {}: {e}", self.tmp.display()),
            }
        }
    }
}

/// Replaces `target` with `contents` atomically.
pub fn write(target: &Path, contents: &[u8], mode: u32) -> Result<(), AtomicError> {
    stage(target, contents, mode)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .expect("reading the temp dir")
            .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn replaces_content_and_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        fs::write(&path, b"old content that is longer").expect("seeding the target");
        write(&path, b"new", 0o600).expect("atomic write");
        assert_eq!(fs::read(&path).expect("reading back"), b"new");
        assert_eq!(fs::metadata(&path).expect("stat").mode() & 0o777, 0o600);
        assert!(leftovers(dir.path()).is_empty(), "temp files left behind");
    }

    #[test]
    fn an_uncommitted_stage_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        fs::write(&path, b"old").expect("seeding the target");
        let staged = stage(&path, b"new", 0o644).expect("staging");
        assert_eq!(
            fs::read(&path).expect("reading"),
            b"old",
            "target changed before commit"
        );
        drop(staged);
        assert_eq!(fs::read(&path).expect("reading"), b"old");
        assert!(leftovers(dir.path()).is_empty(), "temp file not removed on drop");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = write(&dir.path().join("no/such/f"), b"x", 0o644).expect_err("wrote into nowhere");
        assert!(
            matches!(err, AtomicError::Temp { .. }),
            "unexpected error {err:?}"
        );
    }
}
