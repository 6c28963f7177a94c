//! inotify on the directories the agent keeps in shape: the CNI conf dir
//! (the primary's owner rewriting its file), the bin dir (our binary
//! removed or replaced), the service account token's directory (kubelet
//! rotates it by swapping a `..data` symlink) and the plugin settings'
//! directory (a ConfigMap update). Directories, not files: a file watch
//! dies with the inode that an atomic rename replaces.
//!
//! Every kind of change counts, in-place writes included (linkerd2#11228:
//! a watcher that missed "modify" never saw Calico rewrite its conflist).
//! The agent does not interpret events: any event means "reconcile", and
//! reconciling writes only what differs, so our own writes settle.

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot create an inotify instance")]
    Init(#[source] Errno),
    #[error("cannot read inotify events")]
    Read(#[source] Errno),
}

pub struct Watcher {
    inotify: Inotify,
    dirs: Vec<PathBuf>,
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

impl Watcher {
    pub fn new(dirs: Vec<PathBuf>) -> Result<Self, WatchError> {
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(WatchError::Init)?;
        let w = Self { inotify, dirs };
        w.ensure();
        Ok(w)
    }

    /// (Re)adds a watch on each directory that exists: a directory removed
    /// and made again is a new inode. Adding an existing watch is a no-op.
    pub fn ensure(&self) {
        for dir in &self.dirs {
            match self.inotify.add_watch(dir, flags()) {
                Ok(_) => {}
                Err(Errno::ENOENT) => log::debug!("not watching {}: absent", dir.display()),
                Err(e) => log::warn!("cannot watch {}: {e}", dir.display()),
            }
        }
    }

    /// Reads every pending event; returns how many there were.
    pub fn drain(&self) -> Result<usize, WatchError> {
        let mut n = 0;
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => return Ok(n),
                Ok(events) => {
                    for e in &events {
                        log::debug!("inotify: {:?} {:?}", e.mask, e.name);
                    }
                    n += events.len();
                }
                Err(Errno::EAGAIN) => return Ok(n),
                Err(e) => return Err(WatchError::Read(e)),
            }
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}
