//! The selftest's verdict on the running kernel as `mb_config.kernel_flags`
//! records it: the loader writes it, `auto` follows it, `status` and the
//! metrics read it back. Its own module so that the loader, which records
//! it, and the selftest, which reaches it, need not import each other.

use crate::abi::{KERNEL_PROBED, KERNEL_SAFE_ALL, KERNEL_SAFE_MEMBER};

/// What the probes found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Every probe passed: `auto` may redirect into any socket.
    pub safe_all: bool,
    /// Redirection works and a plain map member reads as on plain TCP:
    /// `proxy-only` may let app sockets send redirected.
    pub safe_member: bool,
    /// `MB_KERNEL_HAZARD_*` bits of the probes that did not pass.
    pub hazards: u32,
}

impl Verdict {
    /// The verdict as `mb_config.kernel_flags`.
    pub fn kernel_flags(self) -> u32 {
        let mut flags = KERNEL_PROBED | self.hazards;
        if self.safe_all {
            flags |= KERNEL_SAFE_ALL;
        }
        if self.safe_member {
            flags |= KERNEL_SAFE_MEMBER;
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::header;

    #[test]
    fn flags_carry_every_part_of_the_verdict() {
        let v = Verdict {
            safe_all: false,
            safe_member: true,
            hazards: header::MB_KERNEL_HAZARD_SPLICE,
        };
        assert_eq!(
            v.kernel_flags(),
            KERNEL_PROBED | KERNEL_SAFE_MEMBER | header::MB_KERNEL_HAZARD_SPLICE
        );
        assert_eq!(Verdict::default().kernel_flags(), KERNEL_PROBED);
    }
}
