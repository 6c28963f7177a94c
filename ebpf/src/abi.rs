//! The structs shared with the kernel programs, mirrored from
//! `bpf/include/meshbypass_maps.h`. Sizes are asserted at compile time; change
//! both sides together and bump [`LAYOUT_VERSION`] when a pinned map changes.

use std::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// `MB_LAYOUT_VERSION`: stamped into `mb_config` once every pin exists.
pub const LAYOUT_VERSION: u32 = 4;

/// `MB_DRAIN_SENDER_ACKED`: a direction resumes only once every byte its
/// sender gave TCP is acknowledged.
pub const DRAIN_SENDER_ACKED: u32 = 1 << 0;
/// `MB_DRAIN_RECEIVER_READ`: ... and its receiver read every byte TCP gave it.
pub const DRAIN_RECEIVER_READ: u32 = 1 << 1;

/// `MB_ADAPTIVE_CONNECTED`: `adaptive` admits a connected app socket only if non-blocking.
pub const ADAPTIVE_CONNECTED: u32 = 1 << 0;
/// `MB_ADAPTIVE_LISTENER`: ... an accepted one only if its listener was non-blocking.
pub const ADAPTIVE_LISTENER: u32 = 1 << 1;
/// `MB_ADAPTIVE_SEND`: a send that finds the file blocking evicts the socket.
pub const ADAPTIVE_SEND: u32 = 1 << 2;
/// `MB_ADAPTIVE_DRAINED`: eviction waits until every redirected byte was read.
pub const ADAPTIVE_DRAINED: u32 = 1 << 3;

/// `MB_KERNEL_PROBED`: a selftest verdict was recorded.
pub const KERNEL_PROBED: u32 = 1 << 0;
/// `MB_KERNEL_SAFE_ALL`: the verdict says any socket may receive redirected data.
pub const KERNEL_SAFE_ALL: u32 = 1 << 1;

/// `MB_KERNEL_SAFE_MEMBER`: the verdict says a socket that is only a map
/// member behaves as on plain TCP (proxy-only may then put app sockets in tx).
pub const KERNEL_SAFE_MEMBER: u32 = 1 << 5;

/// `MB_KERNEL_HAZARD_*`: what the selftest found, by probe name.
pub const KERNEL_HAZARDS: [(u32, &str, &str); 6] = [
    (
        1 << 2,
        "redirect",
        "sk_msg redirection does not deliver: nothing is accelerated",
    ),
    (
        1 << 3,
        "splice-reader",
        "splice() readers hang or read EOF on redirected data: auto redirects only into proxy sockets",
    ),
    (
        1 << 4,
        "fionread",
        "FIONREAD does not count redirected data: auto redirects only into proxy sockets",
    ),
    (
        1 << 6,
        "blocking-read",
        "a blocking read() on a redirect target fails with EAGAIN when woken without data: \
         auto redirects only into proxy sockets",
    ),
    (
        1 << 7,
        "blocking-read-member",
        "a blocking read() on a socket that is only a sender in the maps fails with EAGAIN when \
         woken without data: proxy-only and auto keep app sockets out of the maps \
         (sidecar-to-sidecar legs only)",
    ),
    (
        1 << 8,
        "slow-reader",
        "redirected data is not bounded by the receiver (no psock msg_tot_len before Linux 6.14): \
         a reader that stalls lets its writer fill memory up to tcp_mem",
    ),
];

/// No proxy UID/GID (`~0` in `mb_pod`).
pub const NO_ID: u32 = u32::MAX;

/// An address as the kernel programs key it: IPv6, or IPv4 as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr {
    /// Network byte order, as the kernel stores it.
    pub a: [u32; 4],
}

impl Addr {
    pub fn from_ip(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let o = v6.octets();
        let mut a = [0u32; 4];
        for (i, word) in a.iter_mut().enumerate() {
            // Keep the in-memory bytes equal to the octets (network order).
            *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
        }
        Self { a }
    }

    pub fn to_ip(self) -> IpAddr {
        let mut o = [0u8; 16];
        for (i, word) in self.a.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(o);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<Ipv4Addr> for Addr {
    fn from(ip: Ipv4Addr) -> Self {
        Self::from_ip(IpAddr::V4(ip))
    }
}

/// `struct mb_sock_key`: one TCP socket, its netns, its 4-tuple and its
/// socket cookie (never reused: a key names that very socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip: Addr,
    pub remote_ip: Addr,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub pad: u32,
    pub cookie: u64,
}

/// `struct mb_endpoint_key`: one connection as both its ends name it at
/// establishment: the active side's local endpoint in its netns and both
/// initial sequence numbers (+1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub netns: u64,
    pub ip: Addr,
    pub port: u16,
    pub pad0: u16,
    pub seq_active: u32,
    pub seq_passive: u32,
    pub pad1: u32,
}

/// `struct mb_endpoint`: the first end of a connection, waiting for the second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Endpoint {
    pub key: SockKey,
    /// The netns its remote endpoint is in; 0 = none we know.
    pub dest_netns: u64,
    pub flags: u32,
    pub pad: u32,
}

/// `struct mb_pair`: where a socket's sends are redirected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pair {
    pub peer: SockKey,
    pub flags: u32,
    pub pad: u32,
}

/// `MB_PAIR_NAT`.
pub const PAIR_NAT: u32 = 1;
/// `MB_PAIR_PEER_PROXY`: the receiving end is the sidecar proxy's socket.
pub const PAIR_PEER_PROXY: u32 = 1 << 1;

/// `struct mb_pod`: a registered pod, by IP (`mb_pods`) and by netns (`mb_netns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub netns: u64,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub mode: u8,
    pub flags: u8,
    pub pad: u16,
}

/// `struct mb_port_key`: a listening port of a pod (`adaptive`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns: u64,
    /// Host order.
    pub port: u16,
    pub pad0: u16,
    pub pad1: u32,
}

/// `struct mb_port`: what `adaptive` knows of the sockets accepted on a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Port {
    /// `MB_PORT_*`.
    pub flags: u32,
    pub pad: u32,
}

/// `MB_PORT_LISTENER_NONBLOCK`: every listener on the port was non-blocking at listen().
pub const PORT_LISTENER_NONBLOCK: u32 = 1 << 0;
/// `MB_PORT_ACCEPTED_BLOCKING`: a socket accepted there turned out blocking.
pub const PORT_ACCEPTED_BLOCKING: u32 = 1 << 1;

/// `struct mb_config`: node-wide settings, one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub layout_version: u32,
    pub kernel_flags: u32,
    pub probed_at: u64,
    /// FNV-1a of the object file the pinned programs were loaded from.
    pub object_hash: u64,
}

/// `struct mb_sk_state`: per-socket state (socket local storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SkState {
    pub self_key: SockKey,
    pub peer: SockKey,
    pub ep: EndpointKey,
    pub uid: u32,
    pub gid: u32,
    pub flags: u32,
    /// write_seq while no byte of the socket went through TCP.
    pub seq0: u32,
    /// Kernel address of the peer socket while a direction may resume.
    pub target: u64,
}

const _: () = assert!(size_of::<Addr>() == 16);
const _: () = assert!(size_of::<SockKey>() == 56);
const _: () = assert!(size_of::<EndpointKey>() == 40);
const _: () = assert!(size_of::<Endpoint>() == 72);
const _: () = assert!(size_of::<Pair>() == 64);
const _: () = assert!(size_of::<Pod>() == 24);
const _: () = assert!(size_of::<PortKey>() == 16);
const _: () = assert!(size_of::<Port>() == 8);
const _: () = assert!(size_of::<Config>() == 24);
const _: () = assert!(size_of::<SkState>() == 176);

// SAFETY: plain `#[repr(C)]` data without padding holes the kernel reads;
// every field is an integer, so every bit pattern is valid.
unsafe impl aya::Pod for Addr {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for EndpointKey {}
unsafe impl aya::Pod for Endpoint {}
unsafe impl aya::Pod for Pair {}
unsafe impl aya::Pod for Pod {}
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for PortKey {}
unsafe impl aya::Pod for Port {}

/// Acceleration mode of a pod (`MB_MODE_*`): how much of its traffic the
/// bypass may short-circuit. The plugin's `acceleration` setting and the
/// `meshbypass.io/acceleration` annotation name one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `all` when the node's selftest passed, else `proxy-only`.
    #[default]
    Auto = 0,
    /// Redirect every paired direction.
    All = 1,
    /// Redirect only into the sidecar proxy's sockets.
    ProxyOnly = 2,
    /// Track nothing (the iptables redirect only).
    Off = 3,
    /// Proxy sockets, and app sockets only while they are provably safe
    /// members (non-blocking files); opt-in.
    Adaptive = 4,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Mode {
    pub fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            0 => Self::Auto,
            1 => Self::All,
            2 => Self::ProxyOnly,
            3 => Self::Off,
            4 => Self::Adaptive,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::All => "all",
            Self::ProxyOnly => "proxy-only",
            Self::Off => "off",
            Self::Adaptive => "adaptive",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Self::Auto,
            "all" => Self::All,
            "proxy-only" => Self::ProxyOnly,
            "off" => Self::Off,
            "adaptive" => Self::Adaptive,
            _ => return Err(UnknownMode(s.to_owned())),
        })
    }
}

/// A mode name that is not one of `auto`, `all`, `proxy-only`, `off`.
#[derive(Debug, thiserror::Error)]
#[error("unknown acceleration mode {0:?}: use auto, all, proxy-only, adaptive or off")]
pub struct UnknownMode(pub String);

/// Counters (`enum mb_counter`), in index order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    SocketsTracked = 0,
    PairsPlain = 1,
    PairsNat = 2,
    RedirectedMsgs = 3,
    RedirectedBytes = 4,
    PassthroughMsgs = 5,
    PairsRefused = 6,
    MapFull = 7,
    RedirectFailed = 8,
    PassthroughBytes = 9,
    Sticky = 10,
    ReceiverFull = 11,
    Resumed = 12,
    StackBytes = 13,
    Admitted = 14,
    Evicted = 15,
}

/// `MB_CTR_MAX`: slots of `struct mb_counters`.
pub const COUNTER_SLOTS: usize = 16;

/// `struct mb_counters`: every counter of one CPU (the single entry of
/// `mb_counters`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CounterBlock {
    pub v: [u64; COUNTER_SLOTS],
}

const _: () = assert!(size_of::<CounterBlock>() == 128);
// SAFETY: integers only.
unsafe impl aya::Pod for CounterBlock {}

impl Counter {
    pub const ALL: [Counter; 16] = [
        Self::SocketsTracked,
        Self::PairsPlain,
        Self::PairsNat,
        Self::RedirectedMsgs,
        Self::RedirectedBytes,
        Self::PassthroughMsgs,
        Self::PairsRefused,
        Self::MapFull,
        Self::RedirectFailed,
        Self::PassthroughBytes,
        Self::Sticky,
        Self::ReceiverFull,
        Self::Resumed,
        Self::StackBytes,
        Self::Admitted,
        Self::Evicted,
    ];

    /// The name used in `status --json` and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::SocketsTracked => "sockets_tracked",
            Self::PairsPlain => "pairs_plain",
            Self::PairsNat => "pairs_nat",
            Self::RedirectedMsgs => "redirected_msgs",
            Self::RedirectedBytes => "redirected_bytes",
            Self::PassthroughMsgs => "passthrough_msgs",
            Self::PairsRefused => "pairs_refused",
            Self::MapFull => "map_full",
            Self::RedirectFailed => "redirect_failed",
            Self::PassthroughBytes => "passthrough_bytes",
            Self::Sticky => "sticky_directions",
            Self::ReceiverFull => "receiver_full",
            Self::Resumed => "resumed",
            Self::StackBytes => "stack_bytes",
            Self::Admitted => "adaptive_admitted",
            Self::Evicted => "adaptive_evicted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_addresses_are_v4_mapped_in_network_order() {
        let a = Addr::from_ip("10.1.2.3".parse().unwrap());
        let bytes: Vec<u8> = a.a.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(a.to_ip(), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn v6_addresses_round_trip() {
        let ip: IpAddr = "fd00::1:2".parse().unwrap();
        assert_eq!(Addr::from_ip(ip).to_ip(), ip);
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [Mode::Auto, Mode::All, Mode::ProxyOnly, Mode::Off, Mode::Adaptive] {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
            assert_eq!(Mode::from_raw(m as u8), Some(m));
        }
        assert!("fast".parse::<Mode>().is_err());
    }
}
