//! Finding the cgroup v2 hierarchy (at /sys/fs/cgroup on unified hosts, at
//! /sys/fs/cgroup/unified on hybrid ones) and joining a cgroup.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The cgroup2 mount point in this mount namespace (see [`cgroup2_mount_in`]).
pub fn mount_point() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&text)
}

/// One line of `/proc/<pid>/mountinfo` (proc(5)), the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mounted filesystem's directory that appears at `mount_point` ("/" for all of it).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional…] - fstype source super
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let fs_type = after.split(' ').next()?;
            Some(Mount {
                root: PathBuf::from(unescape(fields.get(3)?)),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// The cgroup2 mount point to use: the first one showing the whole hierarchy (root "/"), else
/// the first at all.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<Mount> = parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|mount| mount.fs_type == "cgroup2")
        .collect();
    mounts
        .iter()
        .find(|mount| mount.root == Path::new("/"))
        .or(mounts.first())
        .map(|mount| mount.mount_point.clone())
}

/// Undoes the kernel's octal escapes in mountinfo paths (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|digits| std::str::from_utf8(digits).ok())
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Moves the calling process into the cgroup v2 directory `dir`.
pub fn join(dir: &Path) -> io::Result<()> {
    // "0" names the writer itself.
    fs::write(dir.join("cgroup.procs"), "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 24 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";
    const UNIFIED: &str = "\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        assert_eq!(cgroup2_mount_in(HYBRID), Some("/sys/fs/cgroup/unified".into()));
        assert_eq!(cgroup2_mount_in(UNIFIED), Some("/sys/fs/cgroup".into()));
        assert_eq!(cgroup2_mount_in("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "27 26 0:25 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_in(line), Some("/mnt/with space".into()));
        assert_eq!(unescape(r"a\134b\011c\012"), "a\\b\tc\n");
        assert_eq!(unescape(r"trailing\04"), r"trailing\04");
    }
}
