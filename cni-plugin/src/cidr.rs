//! A tiny CIDR type (std::net only) and the IP family it belongs to.

use std::fmt;
use std::net::{AddrParseError, IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// IPv4 or IPv6: selects `iptables-restore` or `ip6tables-restore` and the CIDRs that apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The restore program for this family.
    pub fn restore_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The save program for this family.
    pub fn save_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{value:?} is not an IP address or CIDR")]
    Addr {
        value: String,
        #[source]
        source: AddrParseError,
    },
    #[error("{value:?} has prefix length {prefix:?}; use 0..={max}")]
    Prefix { value: String, prefix: String, max: u8 },
    #[error("{value:?} has host bits set; did you mean {network}?")]
    HostBits { value: String, network: String },
}

/// An address block `addr/prefix` with no host bits set. A bare address parses as a host
/// (`/32` or `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let cidr = Cidr { addr, prefix };
        (prefix <= max_prefix(addr) && cidr.network() == addr).then_some(cidr)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// Whether the block starts in loopback space (127/8 or ::1), as Istio's `IsLoopback` check.
    pub fn is_loopback(&self) -> bool {
        self.addr.is_loopback()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family() && mask(ip, self.prefix) == self.addr
    }

    fn network(&self) -> IpAddr {
        mask(self.addr, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(value: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match value.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (value, None),
        };
        let addr: IpAddr = addr.parse().map_err(|source| CidrError::Addr {
            value: value.to_owned(),
            source,
        })?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(text) => text
                .parse::<u8>()
                .ok()
                // Reject "+8" and "08": u8's parser takes a leading '+', iptables does not.
                .filter(|p| *p <= max && text == p.to_string())
                .ok_or_else(|| CidrError::Prefix {
                    value: value.to_owned(),
                    prefix: text.to_owned(),
                    max,
                })?,
        };
        Cidr::new(addr, prefix).ok_or_else(|| CidrError::HostBits {
            value: value.to_owned(),
            network: Cidr {
                addr: mask(addr, prefix),
                prefix,
            }
            .to_string(),
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        value.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse()
            .unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
    }

    #[test]
    fn parses_and_displays_both_families() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("192.168.1.7").to_string(), "192.168.1.7/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("2001:0db8:0::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("::/0").family(), Family::V6);
        assert_eq!(cidr("10.0.0.0/8").family(), Family::V4);
    }

    #[test]
    fn rejects_bad_input_with_a_fix() {
        assert!(matches!("10.0.0/8".parse::<Cidr>(), Err(CidrError::Addr { .. })));
        assert!(matches!("*".parse::<Cidr>(), Err(CidrError::Addr { .. })));
        for bad in ["10.0.0.0/33", "10.0.0.0/", "10.0.0.0/x", "10.0.0.0/+8", "::/129"] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Prefix { .. })),
                "{bad:?} should be a prefix error"
            );
        }
        match "10.1.2.3/8".parse::<Cidr>() {
            Err(err @ CidrError::HostBits { .. }) => {
                assert!(err.to_string().contains("10.0.0.0/8"), "suggests: {err}")
            }
            other => panic!("host bits should be rejected, got {other:?}"),
        }
        assert!(matches!(
            "2001:db8::1/32".parse::<Cidr>(),
            Err(CidrError::HostBits { .. })
        ));
    }

    #[test]
    fn loopback_and_containment() {
        assert!(cidr("127.0.0.0/8").is_loopback());
        assert!(cidr("127.0.0.6/32").is_loopback());
        assert!(cidr("::1/128").is_loopback());
        assert!(!cidr("10.0.0.0/8").is_loopback());
        let net = cidr("10.0.0.0/8");
        assert!(net.contains("10.2.3.4".parse().expect("ip")));
        assert!(!net.contains("11.0.0.1".parse().expect("ip")));
        assert!(!net.contains("::1".parse().expect("ip")));
        assert!(cidr("0.0.0.0/0").contains("8.8.8.8".parse().expect("ip")));
    }
}
