//! Finding a pod's cgroup (v2) so the bypass can be attached there: the cgroup2 root under the
//! configured `cgroupRoot`, then the pod's directory in kubelet's layouts.
//!
//! # Which cgroup2 root
//!
//! `cgroupRoot` (default `/sys/fs/cgroup`) is used as is when it is a cgroup2 filesystem or lies
//! inside one (statfs reports `CGROUP2_SUPER_MAGIC` for both). Otherwise, on hybrid hosts
//! (systemd's `unified` layout: cgroup v1 controllers under a tmpfs at /sys/fs/cgroup, cgroup2
//! at /sys/fs/cgroup/unified), `<cgroupRoot>/unified` is used when that is cgroup2. Anything
//! else is an error that names where cgroup2 is mounted, if anywhere, from
//! `/proc/self/mountinfo`.
//!
//! # Where kubelet puts a pod
//!
//! cgroupfs driver: `kubepods/pod<uid>` (Guaranteed), `kubepods/burstable/pod<uid>`,
//! `kubepods/besteffort/pod<uid>`. systemd driver: `kubepods.slice/kubepods-pod<uid_>.slice`,
//! `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`, and the same
//! for besteffort, where `<uid_>` is the UID with `-` written as `_`.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

use crate::ids::PodUid;

pub const MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A pod's cgroup directory and how kubelet laid it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub driver: Driver,
    pub qos: Qos,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "{} is not a cgroup2 filesystem, nor is its unified/ subdirectory; {}",
        root.display(),
        hint(cgroup2_at.as_deref())
    )]
    NotCgroup2 {
        root: PathBuf,
        cgroup2_at: Option<PathBuf>,
    },
    #[error("cannot statfs {}", path.display())]
    Statfs {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error(
        "no cgroup for pod {uid} under {} in kubelet's cgroupfs or systemd layouts",
        root.display()
    )]
    PodNotFound { uid: PodUid, root: PathBuf },
    #[error("cannot inspect {}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", path.display())]
    Mountinfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn hint(cgroup2_at: Option<&Path>) -> String {
    match cgroup2_at {
        Some(mount) => format!("cgroup2 is mounted at {}: set cgroupRoot to it", mount.display()),
        None => "this node has no cgroup2 mount, which the bypass needs".to_owned(),
    }
}

/// kubelet's candidate directories for a pod, relative to the cgroup2 root, with the driver and
/// QoS class each one means: cgroupfs's, then systemd's.
pub fn layouts(uid: &PodUid) -> Vec<(PathBuf, Driver, Qos)> {
    let mut all = cgroupfs_layouts("", uid);
    all.extend(systemd_layouts("", "", uid));
    all
}

/// The same layouts under a kubelet `--cgroup-root` of one component (kind
/// runs kubelet with `cgroupRoot: /kubelet`): `<x>/kubepods/...` with
/// cgroupfs, `<x>.slice/<x>-kubepods.slice/<x>-kubepods-<qos>-pod<uid>.slice`
/// with systemd. `dir` is the root's entry (`kubelet` or `kubelet.slice`).
pub fn prefixed_layouts(dir: &str, uid: &PodUid) -> Vec<(PathBuf, Driver, Qos)> {
    match dir.strip_suffix(".slice") {
        Some(prefix) => systemd_layouts(&format!("{dir}/"), &format!("{prefix}-"), uid),
        None => cgroupfs_layouts(&format!("{dir}/"), uid),
    }
}

/// `<parent>kubepods[/<qos>]/pod<uid>`.
fn cgroupfs_layouts(parent: &str, uid: &PodUid) -> Vec<(PathBuf, Driver, Qos)> {
    let raw = uid.as_str();
    [
        (Qos::Guaranteed, ""),
        (Qos::Burstable, "burstable/"),
        (Qos::BestEffort, "besteffort/"),
    ]
    .into_iter()
    .map(|(qos, class)| {
        let path = PathBuf::from(format!("{parent}kubepods/{class}pod{raw}"));
        (path, Driver::Cgroupfs, qos)
    })
    .collect()
}

/// `<parent><p>kubepods.slice/[<p>kubepods-<qos>.slice/]<p>kubepods[-<qos>]-pod<uid_>.slice`, where
/// `<p>` is the kubelet root's slice prefix (`kubelet-`, or none) and `<uid_>` the escaped UID.
fn systemd_layouts(parent: &str, p: &str, uid: &PodUid) -> Vec<(PathBuf, Driver, Qos)> {
    let escaped = uid.systemd_escaped();
    let top = format!("{parent}{p}kubepods.slice");
    [
        (Qos::Guaranteed, None),
        (Qos::Burstable, Some("burstable")),
        (Qos::BestEffort, Some("besteffort")),
    ]
    .into_iter()
    .map(|(qos, class)| {
        let path = match class {
            None => format!("{top}/{p}kubepods-pod{escaped}.slice"),
            Some(c) => format!("{top}/{p}kubepods-{c}.slice/{p}kubepods-{c}-pod{escaped}.slice"),
        };
        (PathBuf::from(path), Driver::Systemd, qos)
    })
    .collect()
}

/// Finds the pod's directory under `root` (a cgroup2 root, see [`resolve_root`]): kubelet's
/// layouts directly under it first, then under each top-level directory (a kubelet
/// `--cgroup-root`, as kind's `/kubelet`). The UID is a validated [`PodUid`], so nothing in it
/// can leave `root`.
pub fn find_pod_cgroup(root: &Path, uid: &PodUid) -> Result<PodCgroup, CgroupError> {
    let probe = |relative: PathBuf, driver, qos| -> Result<Option<PodCgroup>, CgroupError> {
        let path = root.join(relative);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => Ok(Some(PodCgroup { path, driver, qos })),
            Ok(_) => Ok(None),
            Err(err)
                if err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                Ok(None)
            }
            Err(source) => Err(CgroupError::Inspect { path, source }),
        }
    };
    for (relative, driver, qos) in layouts(uid) {
        if let Some(found) = probe(relative, driver, qos)? {
            return Ok(found);
        }
    }
    let entries = std::fs::read_dir(root).map_err(|source| CgroupError::Inspect {
        path: root.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) || name.starts_with("kubepods") {
            continue;
        }
        for (relative, driver, qos) in prefixed_layouts(&name, uid) {
            if let Some(found) = probe(relative, driver, qos)? {
                return Ok(found);
            }
        }
    }
    Err(CgroupError::PodNotFound {
        uid: uid.clone(),
        root: root.to_owned(),
    })
}

/// Whether `path` is on a cgroup2 filesystem. A missing path is not.
pub fn is_cgroup2(path: &Path) -> Result<bool, CgroupError> {
    match statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == CGROUP2_SUPER_MAGIC),
        Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(false),
        Err(source) => Err(CgroupError::Statfs {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The cgroup2 root to search, from the configured `cgroupRoot` (see the module docs).
pub fn resolve_root(cgroup_root: &Path) -> Result<PathBuf, CgroupError> {
    match resolve_root_with(cgroup_root, is_cgroup2) {
        Err(CgroupError::NotCgroup2 { root, .. }) => Err(CgroupError::NotCgroup2 {
            root,
            cgroup2_at: cgroup2_mount()?,
        }),
        other => other,
    }
}

/// [`resolve_root`] with the filesystem check supplied (for tests).
pub fn resolve_root_with(
    cgroup_root: &Path,
    is_cgroup2: impl Fn(&Path) -> Result<bool, CgroupError>,
) -> Result<PathBuf, CgroupError> {
    if is_cgroup2(cgroup_root)? {
        return Ok(cgroup_root.to_owned());
    }
    let unified = cgroup_root.join("unified");
    if is_cgroup2(&unified)? {
        return Ok(unified);
    }
    Err(CgroupError::NotCgroup2 {
        root: cgroup_root.to_owned(),
        cgroup2_at: None,
    })
}

/// Where this process sees cgroup2 mounted, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<Option<PathBuf>, CgroupError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Mountinfo {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    Ok(cgroup2_mount_in(&text))
}

pub use meshbypass_ebpf::cgroup2::{Mount, cgroup2_mount_in, parse_mountinfo};

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const UID: &str = "0b7e8a4c-1d2f-4e5a-9b3c-123456789abc";

    fn uid() -> PodUid {
        PodUid::parse(UID).expect("test uid is valid")
    }

    fn tree() -> tempfile::TempDir {
        tempfile::tempdir().expect("cannot create a temp dir")
    }

    #[test]
    fn finds_every_layout() {
        let expected = [
            (
                "kubepods/pod0b7e8a4c-1d2f-4e5a-9b3c-123456789abc",
                Driver::Cgroupfs,
                Qos::Guaranteed,
            ),
            (
                "kubepods/burstable/pod0b7e8a4c-1d2f-4e5a-9b3c-123456789abc",
                Driver::Cgroupfs,
                Qos::Burstable,
            ),
            (
                "kubepods/besteffort/pod0b7e8a4c-1d2f-4e5a-9b3c-123456789abc",
                Driver::Cgroupfs,
                Qos::BestEffort,
            ),
            (
                "kubepods.slice/kubepods-pod0b7e8a4c_1d2f_4e5a_9b3c_123456789abc.slice",
                Driver::Systemd,
                Qos::Guaranteed,
            ),
            (
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b7e8a4c_1d2f_4e5a_9b3c_123456789abc.slice",
                Driver::Systemd,
                Qos::Burstable,
            ),
            (
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b7e8a4c_1d2f_4e5a_9b3c_123456789abc.slice",
                Driver::Systemd,
                Qos::BestEffort,
            ),
        ];
        for (relative, driver, qos) in expected {
            let root = tree();
            // A container cgroup below the pod, as kubelet creates them.
            fs::create_dir_all(root.path().join(relative).join("cri-containerd-abc.scope"))
                .expect("cannot build the layout");
            // Another pod beside it must not match.
            fs::create_dir_all(root.path().join("kubepods/burstable/podffffffff"))
                .expect("cannot build the decoy");
            let found = find_pod_cgroup(root.path(), &uid())
                .unwrap_or_else(|e| panic!("{relative} should be found: {e}"));
            assert_eq!(
                found,
                PodCgroup {
                    path: root.path().join(relative),
                    driver,
                    qos,
                }
            );
        }
    }

    #[test]
    fn static_pod_hash_uid() {
        let root = tree();
        let uid = PodUid::parse("6f1c3a0b9a7e4c0b8f0e2d1c3b4a5968").expect("hash uid");
        let dir = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod6f1c3a0b9a7e4c0b8f0e2d1c3b4a5968.slice";
        fs::create_dir_all(root.path().join(dir)).expect("layout");
        let found = find_pod_cgroup(root.path(), &uid).expect("static pod found");
        assert_eq!(found.qos, Qos::BestEffort);
        assert_eq!(found.driver, Driver::Systemd);
    }

    #[test]
    fn missing_pod_is_not_found() {
        let root = tree();
        fs::create_dir_all(root.path().join("kubepods/burstable")).expect("layout");
        // A file where the directory would be is not a cgroup.
        fs::write(
            root.path()
                .join("kubepods/burstable/pod0b7e8a4c-1d2f-4e5a-9b3c-123456789abc"),
            b"",
        )
        .expect("decoy file");
        match find_pod_cgroup(root.path(), &uid()) {
            Err(err @ CgroupError::PodNotFound { .. }) => {
                assert!(err.to_string().contains(UID), "names the pod: {err}")
            }
            other => panic!("expected PodNotFound, got {other:?}"),
        }
        // A file where a parent directory would be (ENOTDIR) is not found either.
        let root = tree();
        fs::write(root.path().join("kubepods"), b"").expect("decoy file");
        assert!(matches!(
            find_pod_cgroup(root.path(), &uid()),
            Err(CgroupError::PodNotFound { .. })
        ));
    }

    #[test]
    fn traversal_uids_never_reach_the_filesystem() {
        for bad in ["../../../etc", "..", "a/b", "0b7e8a4c/../x", "POD"] {
            assert!(PodUid::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    const PURE_V2: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 24 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 25 0:27 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:5 - bpf bpf rw,mode=700
";

    const HYBRID: &str = "\
25 24 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
30 29 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 29 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
34 29 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
";

    const LEGACY: &str = "\
29 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 29 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn mountinfo_finds_cgroup2_in_every_layout() {
        assert_eq!(cgroup2_mount_in(PURE_V2), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            cgroup2_mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_in(LEGACY), None);
        assert_eq!(cgroup2_mount_in(""), None);
    }

    #[test]
    fn mountinfo_prefers_the_whole_hierarchy_and_unescapes() {
        // A container's view: its own cgroup bind-mounted first, the real root later.
        let text = "\
40 39 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw
41 39 0:26 / /host/sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(text),
            Some(PathBuf::from("/host/sys/fs/cgroup x"))
        );
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].root, PathBuf::from("/kubepods/pod1"));
        assert_eq!(mounts[0].fs_type, "cgroup2");
        // Optional fields (shared:, master:) and malformed lines.
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw\ngarbage\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![Mount {
                root: PathBuf::from("/mnt1"),
                mount_point: PathBuf::from("/mnt2"),
                fs_type: "ext3".to_owned(),
            }]
        );
    }

    #[test]
    fn root_resolution_rule() {
        let v2_at = |mounts: &'static [&'static str]| {
            move |path: &Path| Ok(mounts.iter().any(|m| path.starts_with(m)))
        };
        // Pure cgroup2, and a root inside a cgroup2 mount.
        assert_eq!(
            resolve_root_with(Path::new("/sys/fs/cgroup"), v2_at(&["/sys/fs/cgroup"])).expect("pure v2"),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(
            resolve_root_with(
                Path::new("/sys/fs/cgroup/kubelet.slice"),
                v2_at(&["/sys/fs/cgroup"])
            )
            .expect("inside v2"),
            PathBuf::from("/sys/fs/cgroup/kubelet.slice")
        );
        // Hybrid: the tmpfs is not cgroup2, its unified/ is.
        assert_eq!(
            resolve_root_with(Path::new("/sys/fs/cgroup"), v2_at(&["/sys/fs/cgroup/unified"]))
                .expect("hybrid"),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        // Legacy only.
        match resolve_root_with(Path::new("/sys/fs/cgroup"), v2_at(&[])) {
            Err(err @ CgroupError::NotCgroup2 { .. }) => {
                assert!(err.to_string().contains("no cgroup2 mount"), "{err}")
            }
            other => panic!("expected NotCgroup2, got {other:?}"),
        }
        let err = CgroupError::NotCgroup2 {
            root: PathBuf::from("/x"),
            cgroup2_at: Some(PathBuf::from("/mnt/cg2")),
        };
        assert!(
            err.to_string().contains("set cgroupRoot to it") && err.to_string().contains("/mnt/cg2"),
            "{err}"
        );
    }

    #[test]
    fn statfs_agrees_with_mountinfo_on_this_host() {
        assert!(
            !is_cgroup2(Path::new("/proc")).expect("statfs /proc"),
            "/proc is not cgroup2"
        );
        assert!(
            !is_cgroup2(Path::new("/nonexistent/meshbypass")).expect("missing is not an error"),
            "a missing path is not cgroup2"
        );
        let mount = cgroup2_mount().expect("mountinfo is readable");
        if let Some(mount) = mount {
            assert!(
                is_cgroup2(&mount).expect("statfs the cgroup2 mount"),
                "{} is listed as cgroup2",
                mount.display()
            );
            let resolved = resolve_root(&mount).expect("the mount resolves to itself");
            assert_eq!(resolved, mount);
        }
    }

    #[test]
    fn layouts_under_a_kubelet_cgroup_root() {
        let uid = PodUid::parse("0b3c4d5e-1111-2222-3333-444455556666").unwrap();
        let paths = |layouts: Vec<(PathBuf, Driver, Qos)>| {
            layouts
                .into_iter()
                .map(|(p, d, q)| (p.display().to_string(), d, q))
                .collect::<Vec<_>>()
        };
        let e = "0b3c4d5e_1111_2222_3333_444455556666";
        assert_eq!(
            paths(prefixed_layouts("kubelet.slice", &uid)),
            [
                (
                    format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{e}.slice"),
                    Driver::Systemd,
                    Qos::Guaranteed
                ),
                (
                    format!(
                        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/\
                         kubelet-kubepods-burstable-pod{e}.slice"
                    ),
                    Driver::Systemd,
                    Qos::Burstable
                ),
                (
                    format!(
                        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                         kubelet-kubepods-besteffort-pod{e}.slice"
                    ),
                    Driver::Systemd,
                    Qos::BestEffort
                ),
            ]
        );
        let u = uid.as_str();
        assert_eq!(
            paths(prefixed_layouts("kubelet", &uid)),
            [
                (
                    format!("kubelet/kubepods/pod{u}"),
                    Driver::Cgroupfs,
                    Qos::Guaranteed
                ),
                (
                    format!("kubelet/kubepods/burstable/pod{u}"),
                    Driver::Cgroupfs,
                    Qos::Burstable
                ),
                (
                    format!("kubelet/kubepods/besteffort/pod{u}"),
                    Driver::Cgroupfs,
                    Qos::BestEffort
                ),
            ]
        );
    }

    #[test]
    fn finds_pods_under_a_kubelet_cgroup_root_as_on_kind() {
        let uid = PodUid::parse("0b3c4d5e-1111-2222-3333-444455556666").unwrap();
        let esc = uid.systemd_escaped();
        for rel in [
            format!(
                "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod{esc}.slice"
            ),
            format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{esc}.slice"),
            format!("kubelet/kubepods/burstable/pod{}", uid.as_str()),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("system.slice")).unwrap();
            std::fs::create_dir_all(dir.path().join(&rel)).unwrap();
            let found = find_pod_cgroup(dir.path(), &uid).unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert_eq!(found.path, dir.path().join(&rel));
        }
    }
}
