//! Validated identifiers: every value the runtime hands us that may end up in a path (pin names,
//! cgroup directories, netns lookups) goes through one of these newtypes first, so no `..` or `/`
//! ever reaches the filesystem.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// What is wrong with an identifier. Messages complete "… is not a valid X: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} bytes long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("it must start with a letter or a digit, not {found:?}")]
    BadStart { found: char },
    #[error("it contains {found:?}; only {allowed} are allowed")]
    BadChar { found: char, allowed: &'static str },
    #[error("{value:?} is reserved")]
    Reserved { value: &'static str },
}

/// `CNI_CONTAINERID` (and `K8S_POD_INFRA_CONTAINER_ID`): the spec's
/// `^[A-Za-z0-9][A-Za-z0-9_.\-]*$`, at most 256 bytes (containerd and CRI-O use 64 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(String);

impl ContainerId {
    pub const MAX_LEN: usize = 256;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_len(value, Self::MAX_LEN)?;
        let mut chars = value.chars();
        if let Some(first) = chars.next().filter(|c| !c.is_ascii_alphanumeric()) {
            return Err(IdError::BadStart { found: first });
        }
        check_chars(
            chars,
            |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'),
            "letters, digits, '_', '.' and '-'",
        )?;
        Ok(Self(value.to_owned()))
    }

    /// The name used for files and pins of this container (state record,
    /// link pin): the ID itself, or for IDs over 200 bytes (valid, but a
    /// `<id>.json` would pass the 255-byte file name limit) its first 180
    /// bytes and a 64-bit FNV-1a hash of the whole.
    pub fn stem(&self) -> String {
        let id = self.as_str();
        if id.len() <= 200 {
            return id.to_owned();
        }
        let hash = meshbypass_ebpf::fnv1a(id.as_bytes());
        format!("{}-{hash:016x}", &id[..180])
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `CNI_IFNAME`: the spec's rules for a Linux interface name: not empty, shorter than 16 bytes
/// (IFNAMSIZ with its NUL), not `.` or `..`, no `/`, `:` or whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    /// IFNAMSIZ - 1.
    pub const MAX_LEN: usize = 15;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_len(value, Self::MAX_LEN)?;
        for reserved in [".", ".."] {
            if value == reserved {
                return Err(IdError::Reserved { value: reserved });
            }
        }
        check_chars(
            value.chars(),
            |c| !(matches!(c, '/' | ':' | '\0') || c.is_whitespace()),
            "characters other than '/', ':' and whitespace",
        )?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `K8S_POD_UID`: an API-server UID (`8-4-4-4-12` lowercase hex) or, for static pods, kubelet's
/// config hash (lowercase hex). Only `[a-f0-9-]`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_len(value, Self::MAX_LEN)?;
        check_chars(
            value.chars(),
            |c| c.is_ascii_digit() || matches!(c, 'a'..='f' | '-'),
            "lowercase hex digits and '-'",
        )?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The UID as kubelet's systemd cgroup driver writes it in slice names (`-` becomes `_`,
    /// since `-` separates the slice hierarchy).
    pub fn systemd_escaped(&self) -> String {
        self.0.replace('-', "_")
    }
}

/// Not empty, and at most `max` bytes.
fn check_len(value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty);
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            len: value.len(),
            max,
        });
    }
    Ok(())
}

/// The first of `chars` that is not `allowed` (described as `what`) is an error.
fn check_chars(
    mut chars: impl Iterator<Item = char>,
    allowed: impl Fn(char) -> bool,
    what: &'static str,
) -> Result<(), IdError> {
    match chars.find(|c| !allowed(*c)) {
        Some(found) => Err(IdError::BadChar { found, allowed: what }),
        None => Ok(()),
    }
}

macro_rules! id_impls {
    ($ty:ident, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                Self::parse(&value).map_err(|problem| {
                    serde::de::Error::custom(format!("{value:?} is not a valid {}: {problem}", $what))
                })
            }
        }
    };
}

id_impls!(ContainerId, "container id");
id_impls!(IfName, "interface name");
id_impls!(PodUid, "pod uid");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_follow_the_spec() {
        for ok in [
            "a",
            "0",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "pod_1.2-x",
        ] {
            assert!(ContainerId::parse(ok).is_ok(), "{ok:?} should be accepted");
        }
        assert_eq!(ContainerId::parse(""), Err(IdError::Empty));
        assert_eq!(
            ContainerId::parse("../etc"),
            Err(IdError::BadStart { found: '.' })
        );
        assert_eq!(ContainerId::parse("-x"), Err(IdError::BadStart { found: '-' }));
        assert!(matches!(
            ContainerId::parse("a/../../b"),
            Err(IdError::BadChar { found: '/', .. })
        ));
        assert!(matches!(
            ContainerId::parse("a b"),
            Err(IdError::BadChar { found: ' ', .. })
        ));
        assert!(ContainerId::parse(&"a".repeat(256)).is_ok());
        assert_eq!(
            ContainerId::parse(&"a".repeat(257)),
            Err(IdError::TooLong { len: 257, max: 256 })
        );
    }

    #[test]
    fn ifnames_follow_the_spec() {
        for ok in ["eth0", "net1", "a", "x-y_z.w", "123456789012345"] {
            assert!(IfName::parse(ok).is_ok(), "{ok:?} should be accepted");
        }
        assert_eq!(IfName::parse(""), Err(IdError::Empty));
        assert_eq!(
            IfName::parse("1234567890123456"),
            Err(IdError::TooLong { len: 16, max: 15 })
        );
        assert_eq!(IfName::parse("."), Err(IdError::Reserved { value: "." }));
        assert_eq!(IfName::parse(".."), Err(IdError::Reserved { value: ".." }));
        for (bad, c) in [("a/b", '/'), ("eth0:1", ':'), ("a b", ' '), ("a\tb", '\t')] {
            assert!(
                matches!(IfName::parse(bad), Err(IdError::BadChar { found, .. }) if found == c),
                "{bad:?} should be rejected for {c:?}"
            );
        }
    }

    #[test]
    fn pod_uids_are_hex_and_dashes() {
        let uid = PodUid::parse("0b7e8a4c-1d2f-4e5a-9b3c-123456789abc").expect("an API-server uid is valid");
        assert_eq!(uid.systemd_escaped(), "0b7e8a4c_1d2f_4e5a_9b3c_123456789abc");
        PodUid::parse("6f1c3a0b9a7e4c0b8f0e2d1c3b4a5968").expect("a static-pod hash is valid");
        assert!(matches!(
            PodUid::parse("../../etc"),
            Err(IdError::BadChar { found: '.', .. })
        ));
        assert!(matches!(
            PodUid::parse("0B7E"),
            Err(IdError::BadChar { found: 'B', .. })
        ));
        assert!(matches!(
            PodUid::parse("abc_def"),
            Err(IdError::BadChar { found: '_', .. })
        ));
        assert_eq!(
            PodUid::parse(&"a".repeat(65)),
            Err(IdError::TooLong { len: 65, max: 64 })
        );
        assert_eq!(PodUid::parse(""), Err(IdError::Empty));
    }

    #[test]
    fn ids_deserialize_through_validation() {
        let id: ContainerId = serde_json::from_str("\"abc\"").expect("valid id");
        assert_eq!(id.as_str(), "abc");
        let err = serde_json::from_str::<IfName>("\"a/b\"").expect_err("slash is rejected");
        assert!(
            err.to_string().contains("not a valid interface name"),
            "unexpected message: {err}"
        );
    }
}
