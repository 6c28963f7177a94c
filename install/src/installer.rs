//! What the node agent puts on the host and takes off again: the plugin
//! binary in the CNI bin dir, our entry in the primary conflist, the
//! plugin's kubeconfig. Each `ensure_*` writes only when the host differs
//! from what it should be, so re-running it after any change is cheap and
//! never fights the conflist's owner.
//!
//! Order: binary before conflist entry on install; entry before binary on
//! uninstall. The runtime never sees a conflist naming a missing binary.

use std::{
    fs, io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use meshbypass_cni::config::{ConfigError, NetConf};
use serde_json::{Map, Value};

use crate::{
    atomic::{self, AtomicError},
    confdir::{Chained, ConfDir, ConfDirError},
    conflist::PLUGIN_TYPE,
    kubeconfig::{self, ApiServer, KubeconfigError, ServiceAccount},
    metrics::{Artifact, Stats},
};

/// Defaults of the host paths.
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// The plugin's default `stateDir` (cni-plugin/src/config.rs).
pub const DEFAULT_STATE_DIR: &str = "/run/meshbypass";

/// The plugin binary shipped beside this executable (the image has both).
pub fn default_plugin_binary() -> io::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(PLUGIN_TYPE))
}

/// Between taking our entry out and deleting the binary: a runtime that
/// read the conflist just before our edit still finds the binary.
const UNINSTALL_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read the plugin binary {}", path.display())]
    ReadBinary {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the plugin settings {}", path.display())]
    ReadSettings {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the plugin settings {} are not JSON", path.display())]
    ParseSettings {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the plugin settings {} must be a JSON object with \"type\": \"meshbypass\" (or no type)", path.display())]
    BadSettings { path: PathBuf },
    #[error("the plugin settings {} are refused by the plugin's own parser", path.display())]
    InvalidSettings {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] AtomicError),
    #[error(transparent)]
    ConfDir(#[from] ConfDirError),
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
}

impl InstallError {
    /// Why settings were refused, as a fixed name (a metric label); `None`
    /// for errors that are not about the settings.
    pub fn settings_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::ReadSettings { .. } => "unreadable",
            Self::ParseSettings { .. } => "not-json",
            Self::BadSettings { .. } => "not-meshbypass",
            Self::InvalidSettings { source, .. } => match source.as_ref() {
                ConfigError::UnknownKey { .. } => "unknown-key",
                ConfigError::Decode { .. } | ConfigError::NotObject => "not-json",
                ConfigError::WrongType { .. } => "not-meshbypass",
                ConfigError::UnsupportedVersion { .. } => "unsupported-version",
                _ => "invalid-value",
            },
            _ => return None,
        })
    }
}

/// Checks `entry` with the plugin's own parser, as the runtime will hand it
/// over: inside a request whose `cniVersion` and `name` are the list's
/// (libcni sets both on every plugin of a list, so the entry's own, if any,
/// do not count). A key the plugin does not know, a port out of range, a
/// relative path: each fails here, before any ADD could fail on it.
pub fn validate(entry: &Value) -> Result<NetConf, ConfigError> {
    let mut request = match entry {
        Value::Object(obj) => obj.clone(),
        _ => Map::new(),
    };
    request.insert("cniVersion".into(), meshbypass_cni::version::NEWEST.into());
    request.insert("name".into(), "meshbypass-settings".into());
    let bytes = serde_json::to_vec(&Value::Object(request)).expect("a serde_json::Value always serializes");
    NetConf::parse(&bytes)
}

/// Our conflist entry: the settings file (default `{"type": "meshbypass"}`),
/// plus `bpfRoot` / `stateDir` when the agent runs with non-default ones
/// and the settings do not say (plugin and agent must agree); refused
/// unless the plugin's parser accepts it ([`validate`]).
pub fn entry(
    settings: Option<&Path>,
    bpf_root: &Path,
    state_dir: Option<&Path>,
) -> Result<Value, InstallError> {
    let mut obj = match settings {
        None => Map::new(),
        Some(path) => {
            let bytes = fs::read(path).map_err(|source| InstallError::ReadSettings {
                path: path.into(),
                source,
            })?;
            let value: Value =
                serde_json::from_slice(&bytes).map_err(|source| InstallError::ParseSettings {
                    path: path.into(),
                    source,
                })?;
            match value {
                Value::Object(obj) => obj,
                _ => return Err(InstallError::BadSettings { path: path.into() }),
            }
        }
    };
    match obj.get("type") {
        None => {
            obj.insert("type".into(), PLUGIN_TYPE.into());
        }
        Some(t) if t == PLUGIN_TYPE => {}
        Some(_) => {
            return Err(InstallError::BadSettings {
                path: settings.unwrap_or(Path::new("-")).into(),
            });
        }
    }
    if bpf_root != Path::new(meshbypass_ebpf::pins::DEFAULT_BPF_ROOT) && !obj.contains_key("bpfRoot") {
        obj.insert("bpfRoot".into(), bpf_root.to_string_lossy().into());
    }
    if let Some(dir) = state_dir
        && dir != Path::new(DEFAULT_STATE_DIR)
        && !obj.contains_key("stateDir")
    {
        obj.insert("stateDir".into(), dir.to_string_lossy().into());
    }
    let entry = Value::Object(obj);
    if let Err(source) = validate(&entry) {
        return Err(InstallError::InvalidSettings {
            path: settings.unwrap_or(Path::new("-")).into(),
            source: Box::new(source),
        });
    }
    Ok(entry)
}

/// The kubeconfig part, only when running in a cluster.
pub struct KubeSetup {
    pub account: ServiceAccount,
    pub server: ApiServer,
    pub out: PathBuf,
}

/// Identity of a file as last verified: a rename or an in-place write
/// changes it, so an unchanged fingerprint needs no content comparison.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    mode: u32,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        mode: m.permissions().mode() & 0o7777,
    })
}

/// What one [`Installer::reconcile`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub chained: Chained,
}

impl Reconciled {
    /// Installed: the binary is in place and the primary carries our entry.
    pub fn installed(&self) -> bool {
        matches!(self.chained, Chained::Unchanged { .. } | Chained::Written { .. })
    }
}

/// The file in the conf dir that keeps the last valid settings.
pub const LAST_GOOD_SETTINGS: &str = "meshbypass-settings";

pub struct Installer {
    bin_dir: PathBuf,
    conf: ConfDir,
    binary: Vec<u8>,
    /// The entry to chain; `None` until valid settings are known (nothing
    /// is chained, and nothing already chained is touched).
    entry: Option<Value>,
    kube: Option<KubeSetup>,
    stats: Arc<Stats>,
    verified_binary: Option<Fingerprint>,
    verified_kubeconfig: Option<(Fingerprint, Vec<u8>)>,
}

impl Installer {
    /// Reads the plugin binary once: what is copied is what was there when
    /// the agent started (the image's file does not change under us).
    pub fn new(
        bin_dir: &Path,
        conf_dir: &Path,
        plugin_binary: &Path,
        entry: Option<Value>,
        kube: Option<KubeSetup>,
        stats: Arc<Stats>,
    ) -> Result<Self, InstallError> {
        let binary = fs::read(plugin_binary).map_err(|source| InstallError::ReadBinary {
            path: plugin_binary.into(),
            source,
        })?;
        Ok(Self {
            bin_dir: bin_dir.into(),
            conf: ConfDir::new(conf_dir),
            binary,
            entry,
            kube,
            stats,
            verified_binary: None,
            verified_kubeconfig: None,
        })
    }

    /// The plugin's path in the bin dir: the runtime looks up `type` there.
    pub fn target(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    pub fn kube(&self) -> Option<&KubeSetup> {
        self.kube.as_ref()
    }

    pub fn conf_dir(&self) -> &Path {
        self.conf.dir()
    }

    pub fn set_entry(&mut self, entry: Value) {
        self.entry = Some(entry);
    }

    pub fn has_entry(&self) -> bool {
        self.entry.is_some()
    }

    /// Our entry as the primary conflist carries it now, if it passes the
    /// plugin's parser: the last good settings of an earlier run.
    pub fn chained_entry(&self) -> Result<Option<Value>, InstallError> {
        Ok(self.conf.ours()?.filter(|e| validate(e).is_ok()))
    }

    fn record(&self, what: Artifact) {
        self.stats.wrote(what);
    }

    fn make_dir(path: &Path) -> Result<(), InstallError> {
        fs::create_dir_all(path).map_err(|source| InstallError::CreateDir {
            path: path.into(),
            source,
        })
    }

    /// Copies the plugin into the bin dir unless the same bytes are there.
    pub fn ensure_binary(&mut self) -> Result<bool, InstallError> {
        let target = self.target();
        let now = fingerprint(&target);
        if now.is_some() && now == self.verified_binary {
            return Ok(false);
        }
        let same = now.is_some_and(|f| f.len == self.binary.len() as u64 && f.mode & 0o111 != 0)
            && fs::read(&target).is_ok_and(|b| b == self.binary);
        if !same {
            Self::make_dir(&self.bin_dir)?;
            atomic::write(&target, &self.binary, 0o755)?;
            self.record(Artifact::Binary);
            log::info!("copied the plugin to {}", target.display());
        }
        self.verified_binary = fingerprint(&target);
        Ok(!same)
    }

    /// Writes the plugin's kubeconfig when in a cluster and it differs.
    pub fn ensure_kubeconfig(&mut self) -> Result<bool, InstallError> {
        let Some(kube) = &self.kube else {
            return Ok(false);
        };
        let want = kubeconfig::render(&kube.server, &kube.account.read()?);
        let now = fingerprint(&kube.out);
        if let (Some(now), Some((seen, bytes))) = (now, &self.verified_kubeconfig)
            && now == *seen
            && *bytes == want
        {
            return Ok(false);
        }
        let same =
            now.is_some_and(|f| f.mode & 0o777 == 0o600) && fs::read(&kube.out).is_ok_and(|b| b == want);
        if !same {
            if let Some(dir) = kube.out.parent() {
                Self::make_dir(dir)?;
            }
            atomic::write(&kube.out, &want, 0o600)?;
            log::info!("wrote the plugin kubeconfig {}", kube.out.display());
        }
        let out = kube.out.clone();
        if !same {
            self.record(Artifact::Kubeconfig);
        }
        self.verified_kubeconfig = fingerprint(&out).map(|f| (f, want));
        Ok(!same)
    }

    /// Chains our entry into the primary conflist (the binary first).
    pub fn ensure_chained(&mut self) -> Result<Chained, InstallError> {
        self.ensure_binary()?;
        let Some(entry) = &self.entry else {
            return Ok(Chained::NoSettings);
        };
        let chained = self.conf.ensure(entry)?;
        if let Chained::Written { file } = &chained {
            self.record(Artifact::Conflist);
            log::info!("chained meshbypass into {}", self.conf.dir().join(file).display());
        }
        Ok(chained)
    }

    /// Everything, in order: binary, kubeconfig, conflist entry.
    pub fn reconcile(&mut self) -> Result<Reconciled, InstallError> {
        Self::make_dir(self.conf.dir())?;
        self.ensure_binary()?;
        // A kubeconfig that cannot be renewed (an unreadable token) must not
        // keep the entry from being put back: with the previous kubeconfig
        // the plugin works, without one its ADD fails; either way no pod
        // starts without its redirect.
        let kubeconfig = self.ensure_kubeconfig();
        let chained = self.ensure_chained()?;
        kubeconfig?;
        Ok(Reconciled { chained })
    }

    /// Where the last settings that passed the plugin's parser are kept,
    /// beside the conflist (persistent, unlike the state dir's tmpfs; no
    /// extension, so no runtime takes it for a network config).
    fn last_good_path(&self) -> PathBuf {
        self.conf.dir().join(LAST_GOOD_SETTINGS)
    }

    /// Remembers `entry` (valid settings) for a restart that finds the
    /// settings broken and the conflist rewritten without our entry.
    pub fn remember_entry(&self, entry: &Value) -> Result<(), InstallError> {
        let path = self.last_good_path();
        let bytes = serde_json::to_vec_pretty(entry).expect("a JSON value serializes");
        if fs::read(&path).is_ok_and(|b| b == bytes) {
            return Ok(());
        }
        atomic::write(&path, &bytes, 0o644)?;
        Ok(())
    }

    /// The settings [`Installer::remember_entry`] kept, if they still pass
    /// the plugin's parser.
    pub fn remembered_entry(&self) -> Option<Value> {
        let bytes = fs::read(self.last_good_path()).ok()?;
        let entry: Value = serde_json::from_slice(&bytes).ok()?;
        validate(&entry).is_ok().then_some(entry)
    }

    /// Whether the host is as it should be right now (for `/readyz`).
    pub fn is_installed(&self) -> bool {
        fs::read(self.target()).is_ok_and(|b| b == self.binary)
            && self
                .entry
                .as_ref()
                .is_some_and(|e| self.conf.is_chained(e).unwrap_or(false))
    }

    /// Takes everything off the host: our conflist entries first, then the
    /// binary, then the kubeconfig. Stops at the first failure so that the
    /// binary never goes while an entry may still name it.
    pub fn uninstall(&self) -> Result<Vec<PathBuf>, InstallError> {
        uninstall(
            self.conf.dir(),
            &self.bin_dir,
            self.kube.as_ref().map(|k| k.out.as_path()),
        )
    }
}

/// [`Installer::uninstall`] without a binary to install (the `uninstall`
/// subcommand). Returns what was removed or edited.
pub fn uninstall(
    conf_dir: &Path,
    bin_dir: &Path,
    kubeconfig: Option<&Path>,
) -> Result<Vec<PathBuf>, InstallError> {
    let mut done: Vec<PathBuf> = ConfDir::new(conf_dir)
        .remove_ours()?
        .into_iter()
        .map(|f| conf_dir.join(f))
        .collect();
    if !done.is_empty() {
        log::info!("removed meshbypass from {done:?}");
        std::thread::sleep(UNINSTALL_GRACE);
    }
    let last_good = conf_dir.join(LAST_GOOD_SETTINGS);
    for path in [
        Some(bin_dir.join(PLUGIN_TYPE).as_path()),
        kubeconfig,
        Some(last_good.as_path()),
    ]
    .into_iter()
    .flatten()
    {
        match fs::remove_file(path) {
            Ok(()) => done.push(path.into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(InstallError::Remove {
                    path: path.into(),
                    source,
                });
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn installer(tmp: &Path, binary: &[u8]) -> Installer {
        let src = tmp.join("plugin-src");
        fs::write(&src, binary).expect("writing the source binary");
        Installer::new(
            &tmp.join("bin"),
            &tmp.join("net.d"),
            &src,
            Some(json!({"type": "meshbypass"})),
            None,
            Arc::new(Stats::default()),
        )
        .expect("installer")
    }

    #[test]
    fn entry_defaults_and_agent_paths() {
        let e = entry(None, Path::new(meshbypass_ebpf::pins::DEFAULT_BPF_ROOT), None).expect("entry");
        assert_eq!(e, json!({"type": "meshbypass"}));
        let e = entry(None, Path::new("/sys/fs/bpf/x"), Some(Path::new("/run/x"))).expect("entry");
        assert_eq!(
            e,
            json!({"type": "meshbypass", "bpfRoot": "/sys/fs/bpf/x", "stateDir": "/run/x"})
        );
        let tmp = tempfile::tempdir().expect("temp dir");
        let settings = tmp.path().join("s.json");
        fs::write(&settings, r#"{"mesh":"linkerd","bpfRoot":"/sys/fs/bpf/y"}"#).expect("writing settings");
        let e = entry(Some(&settings), Path::new("/sys/fs/bpf/x"), None).expect("entry");
        assert_eq!(
            e,
            json!({"type": "meshbypass", "mesh": "linkerd", "bpfRoot": "/sys/fs/bpf/y"})
        );
        fs::write(&settings, r#"{"type":"bridge"}"#).expect("writing settings");
        assert!(matches!(
            entry(Some(&settings), Path::new("/sys/fs/bpf/x"), None),
            Err(InstallError::BadSettings { .. })
        ));
    }

    /// The plugin's parser judges the settings: what it refuses never
    /// becomes an entry, and the error names the key or the value.
    #[test]
    fn settings_go_through_the_plugins_parser() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let settings = tmp.path().join("s.json");
        let root = Path::new("/sys/fs/bpf/x");
        for (text, reason, names) in [
            (
                r#"{"mesh":"istio","acceleraton":"all"}"#,
                "unknown-key",
                "`acceleraton`",
            ),
            (
                r#"{"redirect":{"outbondPort":15001}}"#,
                "unknown-key",
                "`redirect.outbondPort`",
            ),
            (
                r#"{"redirect":{"outboundPort":70000}}"#,
                "invalid-value",
                "redirect.outboundPort",
            ),
            (r#"{"acceleration":"fast"}"#, "invalid-value", "acceleration"),
            (r#"{"stateDir":"run/x"}"#, "invalid-value", "run/x"),
            (r#"{"mesh":"istio","#, "not-json", "not JSON"),
        ] {
            fs::write(&settings, text).expect("writing settings");
            let err = entry(Some(&settings), root, None).expect_err(text);
            assert_eq!(err.settings_reason(), Some(reason), "{text}: {err:?}");
            let message = meshbypass_ebpf::chain::error_chain(&err);
            assert!(message.contains(names), "{text}: {message}");
        }
        fs::write(
            &settings,
            r#"{"mesh":"linkerd","acceleration":"proxy-only","redirect":{"excludeOutboundPorts":[443]}}"#,
        )
        .expect("writing settings");
        let ok = entry(Some(&settings), root, None).expect("valid settings");
        assert_eq!(ok["mesh"], "linkerd");
        assert_eq!(
            validate(&ok).expect("valid").redirect.exclude_outbound_ports,
            [443]
        );
    }

    #[test]
    fn copies_the_binary_once_and_repairs_it() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut inst = installer(tmp.path(), b"\x7fELF plugin v1");
        assert!(inst.ensure_binary().expect("first copy"), "not copied");
        assert!(!inst.ensure_binary().expect("second copy"), "copied twice");
        let target = inst.target();
        assert_eq!(
            fs::metadata(&target).expect("stat").permissions().mode() & 0o777,
            0o755
        );
        fs::write(&target, b"tampered").expect("tampering");
        assert!(inst.ensure_binary().expect("repair"), "not repaired");
        assert_eq!(fs::read(&target).expect("reading"), b"\x7fELF plugin v1");
        fs::remove_file(&target).expect("deleting");
        assert!(inst.ensure_binary().expect("repair"), "not restored");
    }

    /// Readers of the target see the old binary or the new one, whole:
    /// never a truncated or mixed file.
    #[test]
    fn binary_copy_is_atomic_for_concurrent_readers() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let a = vec![b'a'; 1 << 20];
        let b = vec![b'b'; 3 << 20];
        let mut inst_a = installer(tmp.path(), &a);
        inst_a.ensure_binary().expect("first copy");
        let target = inst_a.target();
        let src_b = tmp.path().join("plugin-b");
        fs::write(&src_b, &b).expect("writing b");
        let mut inst_b = Installer::new(
            &tmp.path().join("bin"),
            &tmp.path().join("net.d"),
            &src_b,
            Some(json!({"type": "meshbypass"})),
            None,
            Arc::new(Stats::default()),
        )
        .expect("installer b");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (target, stop) = (target.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = fs::read(&target).expect("the target vanished during a copy");
                    let whole_a = got.len() == 1 << 20 && got.iter().all(|&c| c == b'a');
                    let whole_b = got.len() == 3 << 20 && got.iter().all(|&c| c == b'b');
                    assert!(
                        whole_a || whole_b,
                        "a reader saw a partial file of {} bytes",
                        got.len()
                    );
                    reads += 1;
                }
                reads
            })
        };
        let deadline = Instant::now() + Duration::from_millis(700);
        let mut copies = 0;
        while Instant::now() < deadline {
            // Each installer finds the other's bytes and replaces them.
            let inst = if copies % 2 == 0 { &mut inst_b } else { &mut inst_a };
            assert!(inst.ensure_binary().expect("copy"), "nothing copied");
            copies += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().expect("the reader saw a partial file");
        assert!(
            copies > 2 && reads > 2,
            "too little overlap: {copies} copies, {reads} reads"
        );
    }
}
