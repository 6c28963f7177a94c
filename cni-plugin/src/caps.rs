//! The capabilities ADD, DEL and CHECK need, checked before anything is touched, so a plugin run
//! without them fails at once with a message naming what is missing instead of half-configuring a
//! pod and failing somewhere deep (a refused `setns`, an `iptables-restore` permission error, a
//! `bpf()` EPERM).
//!
//! - `CAP_SYS_ADMIN`: `setns()` into the pod's network namespace (the kernel wants it in both the
//!   caller's and the target's user namespace), mounting bpffs, and `bpf()` itself (it stands in
//!   for `CAP_BPF`, which alone would not cover `setns`).
//! - `CAP_NET_ADMIN`: the pod's `nat` table (`iptables-restore`/`iptables-save`), attaching the
//!   sockops program to a cgroup and loading networking programs.
//!
//! Container runtimes run CNI plugins as root with every capability; these are missing only when
//! the plugin is run by hand, or from a container that dropped them.

use std::{fmt, fs, io};

use crate::error::CniError;

/// A capability, by its bit number in the kernel's sets (`linux/capability.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub bit: u32,
    pub name: &'static str,
    /// What the plugin uses it for.
    pub why: &'static str,
}

pub const CAP_NET_ADMIN: Cap = Cap {
    bit: 12,
    name: "CAP_NET_ADMIN",
    why: "the pod's iptables redirect and the cgroup sockops attachment",
};
pub const CAP_SYS_ADMIN: Cap = Cap {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    why: "entering the pod's network namespace, bpffs and bpf()",
};

/// What ADD, DEL and CHECK need, in the order they are reported.
pub const REQUIRED: [Cap; 2] = [CAP_NET_ADMIN, CAP_SYS_ADMIN];

/// The effective set could not be read or lacks capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot read the effective capabilities from /proc/self/status")]
    Read(#[source] io::Error),
    #[error("/proc/self/status has no readable CapEff line")]
    NoCapEff,
    #[error("{}", Missing(.missing))]
    Missing { missing: Vec<Cap> },
}

/// "lacks CAP_X (for …) and CAP_Y (for …); run it as root with them, as container runtimes do".
struct Missing<'a>(&'a [Cap]);

impl fmt::Display for Missing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the plugin lacks ")?;
        for (i, cap) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            write!(f, "{} (for {})", cap.name, cap.why)?;
        }
        f.write_str("; run it as root with these capabilities, as container runtimes do")
    }
}

/// `CapEff` from the text of `/proc/<pid>/status`.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The required capabilities absent from `effective`.
pub fn missing(effective: u64) -> Vec<Cap> {
    REQUIRED
        .into_iter()
        .filter(|cap| effective & (1u64 << cap.bit) == 0)
        .collect()
}

/// Checks this process's effective set.
pub fn check() -> Result<(), CapsError> {
    let status = fs::read_to_string("/proc/self/status").map_err(CapsError::Read)?;
    let effective = parse_cap_eff(&status).ok_or(CapsError::NoCapEff)?;
    let missing = missing(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapsError::Missing { missing })
    }
}

/// [`check`] as the CNI error ADD, DEL and CHECK return: code 50 (the plugin cannot serve the
/// request on this node), the missing capabilities named in `msg`, what each is for in `details`.
pub fn require() -> Result<(), CniError> {
    check().map_err(|e| {
        let reason = match &e {
            CapsError::Missing { missing } => {
                match (missing.contains(&CAP_NET_ADMIN), missing.contains(&CAP_SYS_ADMIN)) {
                    (true, true) => "it lacks the capabilities CAP_NET_ADMIN and CAP_SYS_ADMIN",
                    (true, false) => "it lacks the capability CAP_NET_ADMIN",
                    _ => "it lacks the capability CAP_SYS_ADMIN",
                }
            }
            CapsError::Read(_) | CapsError::NoCapEff => "its capabilities cannot be read",
        };
        CniError::NotAvailable {
            reason,
            source: Some(Box::new(e)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tmeshbypass\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                          CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";

    #[test]
    fn reads_cap_eff() {
        assert_eq!(parse_cap_eff(STATUS), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("CapEff:\t0000000000001000\n"), Some(1 << 12));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn names_what_is_missing() {
        assert!(missing(0x1ff_ffff_ffff).is_empty());
        assert_eq!(missing(0), vec![CAP_NET_ADMIN, CAP_SYS_ADMIN]);
        assert_eq!(missing(1 << 21), vec![CAP_NET_ADMIN]);
        assert_eq!(missing(1 << 12), vec![CAP_SYS_ADMIN]);
        // CAP_BPF (39) alone does not replace CAP_SYS_ADMIN: setns needs the latter.
        assert_eq!(missing((1 << 12) | (1 << 39)), vec![CAP_SYS_ADMIN]);
        let msg = CapsError::Missing { missing: missing(0) }.to_string();
        assert!(
            msg.contains("CAP_NET_ADMIN (for") && msg.contains("and CAP_SYS_ADMIN (for"),
            "{msg}"
        );
    }

    #[test]
    fn the_cni_error_is_code_50_and_names_them() {
        let e = CniError::NotAvailable {
            reason: "it lacks the capability CAP_SYS_ADMIN",
            source: Some(Box::new(CapsError::Missing {
                missing: vec![CAP_SYS_ADMIN],
            })),
        };
        let reply = e.reply("1.1.0");
        assert_eq!(reply.code, 50);
        assert!(reply.msg.contains("CAP_SYS_ADMIN"), "{reply:?}");
        assert!(
            reply.details.contains("entering the pod's network namespace"),
            "{reply:?}"
        );
    }
}
