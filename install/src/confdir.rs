//! The host's CNI conf dir: find the primary network config, chain our
//! entry into it, take it out again. The edits themselves are `conflist.rs`;
//! this file reads, writes atomically and guards against the owner (Calico,
//! Flannel, kindnet) rewriting its file at the same moment: the file is read
//! again just before our rename, and a change means "start over" instead of
//! overwriting the owner's newer content with our edit of the older one.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde_json::Value;

use crate::{
    atomic::{self, AtomicError},
    conflist::{self, ConflistError, Edit},
};

/// Attempts when the owner keeps rewriting the file under us.
const ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum ConfDirError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid JSON (being written? it is read again on its next change)", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Conflist(#[from] ConflistError),
    #[error(transparent)]
    Write(#[from] AtomicError),
    #[error("cannot remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot turn {from} into a list: {} exists and was not made by meshbypass from it; \
         remove one of the two", path.display()
    )]
    Foreign { path: PathBuf, from: String },
    #[error("{} kept changing while we edited it ({ATTEMPTS} attempts)", path.display())]
    Busy { path: PathBuf },
    #[error(
        "the network config {name:?} has a name that is not UTF-8: the runtime may read it, \
         meshbypass cannot chain into it; rename it"
    )]
    NotUtf8 { name: String },
}

/// What [`ConfDir::ensure`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chained {
    /// No network config yet (the primary CNI is not installed yet).
    NoPrimary,
    /// No valid settings known yet: nothing was chained or changed.
    NoSettings,
    /// Our entry was already in place in this file.
    Unchanged { file: String },
    /// This file was (re)written with our entry.
    Written { file: String },
}

pub struct ConfDir {
    dir: PathBuf,
}

/// A file's bytes as read, to detect a concurrent rewrite.
struct Read {
    bytes: Vec<u8>,
    doc: Value,
    mode: u32,
}

enum Step {
    Done(Chained),
    Retry,
}

impl ConfDir {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The names libcni would consider (files, not directories), sorted.
    pub fn config_names(&self) -> Result<Vec<String>, ConfDirError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ConfDirError::Read {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ConfDirError::Read {
                path: self.dir.clone(),
                source,
            })?;
            let name = match entry.file_name().into_string() {
                Ok(name) => name,
                // The runtime would read it (libcni sorts bytes, not text):
                // chaining into another file would leave pods unredirected.
                Err(raw) if conflist::is_config_name(&raw.to_string_lossy()) => {
                    return Err(ConfDirError::NotUtf8 {
                        name: raw.to_string_lossy().into_owned(),
                    });
                }
                Err(_) => continue,
            };
            if conflist::is_config_name(&name) && !entry.file_type().is_ok_and(|t| t.is_dir()) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The runtime's network config file, if any.
    pub fn primary(&self) -> Result<Option<String>, ConfDirError> {
        Ok(conflist::primary(self.config_names()?.iter().map(String::as_str)).map(str::to_owned))
    }

    /// `None` when the file vanished.
    fn read(&self, name: &str) -> Result<Option<Read>, ConfDirError> {
        let path = self.path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ConfDirError::Read { path, source }),
        };
        let mode = match fs::metadata(&path) {
            Ok(m) => m.permissions().mode() & 0o777,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ConfDirError::Read { path, source }),
        };
        let doc = serde_json::from_slice(&bytes).map_err(|source| ConfDirError::Parse { path, source })?;
        Ok(Some(Read { bytes, doc, mode }))
    }

    fn unchanged(&self, name: &str, before: &Read) -> Result<bool, ConfDirError> {
        let path = self.path(name);
        match fs::read(&path) {
            Ok(now) => Ok(now == before.bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ConfDirError::Read { path, source }),
        }
    }

    fn remove_file(&self, name: &str) -> Result<(), ConfDirError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ConfDirError::Remove { path, source }),
        }
    }

    /// Writes `edit` if `source` (read as `before`) is still what we read;
    /// `false` when it changed meanwhile (the caller starts over).
    fn apply(&self, source: &str, before: &Read, edit: &Edit) -> Result<bool, ConfDirError> {
        let staged = atomic::stage(&self.path(&edit.file), &conflist::render(&edit.doc), before.mode)?;
        if !self.unchanged(source, before)? {
            return Ok(false);
        }
        staged.commit()?;
        if let Some(old) = &edit.remove {
            self.remove_file(old)?;
        }
        Ok(true)
    }

    /// Chains `ours` into the primary config unless it is already there
    /// exactly: writes only when our entry is missing or different, so an
    /// owner rewriting its file and us never take turns forever.
    pub fn ensure(&self, ours: &Value) -> Result<Chained, ConfDirError> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match self.ensure_once(ours, &mut last)? {
                Step::Done(c) => return Ok(c),
                Step::Retry => continue,
            }
        }
        Err(ConfDirError::Busy {
            path: self.path(&last.unwrap_or_default()),
        })
    }

    fn ensure_once(&self, ours: &Value, last: &mut Option<String>) -> Result<Step, ConfDirError> {
        let Some(name) = self.primary()? else {
            return Ok(Step::Done(Chained::NoPrimary));
        };
        *last = Some(name.clone());
        let Some(before) = self.read(&name)? else {
            return Ok(Step::Retry);
        };
        let Some(edit) = conflist::inject(&name, &before.doc, ours)? else {
            return Ok(Step::Done(Chained::Unchanged { file: name }));
        };
        if edit.file != name {
            // Converting X.conf: X.conflist may be ours from before (then
            // it is replaced), or somebody else's (then we stop).
            if let Some(existing) = self.read(&edit.file)? {
                let from = existing.doc.get(conflist::CONVERTED_FROM).and_then(Value::as_str);
                if from != Some(name.as_str()) {
                    return Err(ConfDirError::Foreign {
                        path: self.path(&edit.file),
                        from: name,
                    });
                }
            }
        }
        if !self.apply(&name, &before, &edit)? {
            return Ok(Step::Retry);
        }
        Ok(Step::Done(Chained::Written { file: edit.file }))
    }

    /// Our entry as the primary config carries it now, if any.
    pub fn ours(&self) -> Result<Option<Value>, ConfDirError> {
        let Some(name) = self.primary()? else {
            return Ok(None);
        };
        Ok(self
            .read(&name)?
            .and_then(|read| conflist::ours(&name, &read.doc)))
    }

    /// Whether the primary config carries exactly our entry.
    pub fn is_chained(&self, ours: &Value) -> Result<bool, ConfDirError> {
        let Some(name) = self.primary()? else {
            return Ok(false);
        };
        let Some(read) = self.read(&name)? else {
            return Ok(false);
        };
        Ok(conflist::is_list_name(&name) && conflist::inject(&name, &read.doc, ours)?.is_none())
    }

    /// Takes our entry out of every config file that has one (the primary
    /// may have changed since we chained into it); a conflist we converted
    /// becomes its single config again unless the owner already wrote a new
    /// one. Returns the files edited. Unreadable files are skipped with a
    /// warning: they are not ours to judge.
    pub fn remove_ours(&self) -> Result<Vec<String>, ConfDirError> {
        let mut edited = Vec::new();
        for name in self.config_names()? {
            for attempt in 1..=ATTEMPTS {
                let before = match self.read(&name) {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e @ ConfDirError::Parse { .. }) => {
                        log::warn!("{e}; left alone");
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let edit = match conflist::remove(&name, &before.doc) {
                    Ok(Some(edit)) => edit,
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("{e}; left alone");
                        break;
                    }
                };
                if edit.file != name && self.path(&edit.file).exists() {
                    // The owner wrote a fresh single config: it wins.
                    self.remove_file(&name)?;
                } else if !self.apply(&name, &before, &edit)? {
                    if attempt == ATTEMPTS {
                        return Err(ConfDirError::Busy {
                            path: self.path(&name),
                        });
                    }
                    continue;
                }
                edited.push(name.clone());
                break;
            }
        }
        Ok(edited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ours() -> Value {
        json!({"type": "meshbypass"})
    }

    fn read_json(path: &Path) -> Value {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("listing")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8 name"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn converts_a_single_conf_and_restores_it() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let conf = json!({"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel"});
        fs::write(tmp.path().join("10-flannel.conf"), conf.to_string()).expect("seeding");
        fs::write(
            tmp.path().join("99-loopback.conf"),
            r#"{"name":"lo","type":"loopback"}"#,
        )
        .expect("seeding");
        let cd = ConfDir::new(tmp.path());
        assert_eq!(
            cd.ensure(&ours()).expect("ensure"),
            Chained::Written {
                file: "10-flannel.conflist".into()
            }
        );
        assert_eq!(names(tmp.path()), ["10-flannel.conflist", "99-loopback.conf"]);
        assert!(cd.is_chained(&ours()).expect("is_chained"));
        assert_eq!(
            cd.ensure(&ours()).expect("ensure"),
            Chained::Unchanged {
                file: "10-flannel.conflist".into()
            }
        );
        // Flannel restarts and writes its .conf again: it sorts first.
        fs::write(tmp.path().join("10-flannel.conf"), conf.to_string()).expect("rewriting");
        assert!(!cd.is_chained(&ours()).expect("is_chained"));
        assert_eq!(
            cd.ensure(&ours()).expect("ensure"),
            Chained::Written {
                file: "10-flannel.conflist".into()
            }
        );
        assert_eq!(names(tmp.path()), ["10-flannel.conflist", "99-loopback.conf"]);
        assert_eq!(cd.remove_ours().expect("remove"), ["10-flannel.conflist"]);
        assert_eq!(names(tmp.path()), ["10-flannel.conf", "99-loopback.conf"]);
        assert_eq!(read_json(&tmp.path().join("10-flannel.conf")), conf);
    }

    #[test]
    fn refuses_to_overwrite_a_foreign_conflist() {
        let tmp = tempfile::tempdir().expect("temp dir");
        fs::write(tmp.path().join("10-x.conf"), r#"{"name":"x","type":"bridge"}"#).expect("seeding");
        let foreign = r#"{"name":"y","plugins":[{"type":"ptp"}]}"#;
        fs::write(tmp.path().join("10-x.conflist"), foreign).expect("seeding");
        let err = ConfDir::new(tmp.path())
            .ensure(&ours())
            .expect_err("overwrote a foreign file");
        assert!(
            matches!(err, ConfDirError::Foreign { .. }),
            "unexpected error {err}"
        );
        assert_eq!(
            fs::read_to_string(tmp.path().join("10-x.conflist")).expect("reading"),
            foreign
        );
    }

    #[test]
    fn no_config_and_no_dir_mean_no_primary() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let cd = ConfDir::new(&tmp.path().join("absent"));
        assert_eq!(cd.ensure(&ours()).expect("ensure"), Chained::NoPrimary);
        assert!(cd.remove_ours().expect("remove").is_empty());
    }

    #[test]
    fn removes_our_entry_from_every_file_keeping_the_mode() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let a = json!({"name": "a", "plugins": [{"type": "bridge"}, {"type": "meshbypass"}]});
        let b = json!({"name": "b", "plugins": [{"type": "ptp"}, {"type": "meshbypass"}]});
        fs::write(tmp.path().join("10-a.conflist"), a.to_string()).expect("seeding");
        fs::write(tmp.path().join("20-b.conflist"), b.to_string()).expect("seeding");
        fs::set_permissions(
            tmp.path().join("20-b.conflist"),
            fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let cd = ConfDir::new(tmp.path());
        assert_eq!(
            cd.remove_ours().expect("remove"),
            ["10-a.conflist", "20-b.conflist"]
        );
        assert_eq!(
            read_json(&tmp.path().join("20-b.conflist")),
            json!({"name": "b", "plugins": [{"type": "ptp"}]})
        );
        let mode = fs::metadata(tmp.path().join("20-b.conflist"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "mode not kept");
    }
}
