//! The CNI spec versions this plugin speaks, and what each one defines.
//!
//! A chained plugin gets the conflist's `cniVersion`, whatever it is: Calico, Flannel, kindnet
//! and Cilium ship 0.3.1, the reference plugins' examples 1.0.0. 0.3.0 is the oldest with
//! `prevResult` (plugin chaining); 0.1.0 and 0.2.0 had no chaining and are refused (code 1).
//! What changes between the versions we speak:
//!
//! * CHECK, and `prevResult` on DEL, came with 0.4.0: before it DEL works from the pod's record
//!   alone, and CHECK is refused as the spec's "incompatible CNI version" (code 1), as libcni's
//!   `skel` refuses it;
//! * the result's `ips[].version` ("4"/"6") is required up to 0.4.0 and gone from 1.0.0;
//! * STATUS and GC came with 1.1.0.

use crate::env::Command;

/// What VERSION reports, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version used for replies when the request's own version is unknown (e.g. stdin did not
/// parse).
pub const NEWEST: &str = "1.1.0";

/// The first version whose results have no `ips[].version`.
pub const UNVERSIONED_IPS_SINCE: &str = "1.0.0";

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// The first version that defines `command`; `None` for ADD, DEL and VERSION, which every
/// version we speak defines.
pub fn defined_since(command: Command) -> Option<&'static str> {
    match command {
        Command::Check => Some("0.4.0"),
        Command::Status | Command::Gc => Some("1.1.0"),
        Command::Add | Command::Del | Command::Version => None,
    }
}

/// `version` is `min` or later (both `major.minor.patch`; an unparsable `version` is not).
pub fn at_least(version: &str, min: &str) -> bool {
    match (parse(version), parse(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

fn parse(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_a_chained_plugin_is_sent() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            assert!(is_supported(v), "{v}");
        }
        for v in ["0.1.0", "0.2.0", "1.1", "1.2.0", "", "v1.0.0"] {
            assert!(!is_supported(v), "{v}");
        }
        assert!(is_supported(NEWEST));
        assert_eq!(SUPPORTED_VERSIONS.last(), Some(&NEWEST));
        assert!(
            SUPPORTED_VERSIONS.windows(2).all(|w| !at_least(w[0], w[1])),
            "oldest first"
        );
    }

    #[test]
    fn commands_stay_where_the_spec_puts_them() {
        let defined = |c: Command, v: &str| defined_since(c).is_none_or(|since| at_least(v, since));
        for v in SUPPORTED_VERSIONS {
            assert!(defined(Command::Add, v) && defined(Command::Del, v) && defined(Command::Version, v));
        }
        for (v, check, status_gc) in [
            ("0.3.0", false, false),
            ("0.3.1", false, false),
            ("0.4.0", true, false),
            ("1.0.0", true, false),
            ("1.1.0", true, true),
        ] {
            assert_eq!(defined(Command::Check, v), check, "CHECK in {v}");
            assert_eq!(defined(Command::Status, v), status_gc, "STATUS in {v}");
            assert_eq!(defined(Command::Gc, v), status_gc, "GC in {v}");
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(at_least("0.10.0", "0.4.0"));
        assert!(at_least("1.0.0", "1.0.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(!at_least("1.0", "0.4.0"));
        assert!(!at_least("1.0.0.0", "0.4.0"));
        assert!(!at_least("x", "0.4.0"));
    }
}
