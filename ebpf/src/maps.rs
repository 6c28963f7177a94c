//! The open handle on a node's pinned maps and programs ([`NodeMaps`]):
//! opening the pins a loader made (they must carry this binary's layout
//! stamp), the node-wide settings, and read access to the datapath's
//! state for status, GC and tests. Pod registration (`pods.rs`), cgroup
//! links (`attach.rs`) and counters (`counters.rs`) add their methods.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash};

use crate::{
    abi::{
        Addr, Config, CounterBlock, Endpoint, EndpointKey, LAYOUT_VERSION, Pair, Pod, PodSockets, Port,
        PortKey, SockKey,
    },
    pins::{self, Pins},
    sys::SyscallError,
    verdict::Verdict,
};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the node's maps are not loaded at {}: run `meshbypass-node load`", root.display())]
    NotLoaded { root: PathBuf },
    #[error(
        "the pins at {} have layout version {found}, this binary uses {LAYOUT_VERSION}: \
         run the matching meshbypass version, or `meshbypass-node unload` and load again \
         (running pods lose acceleration until re-added)",
        root.display()
    )]
    LayoutMismatch { root: PathBuf, found: String },
    #[error(
        "the pins at {} are incomplete ({} missing): run `meshbypass-node unload` and load again",
        root.display(), missing.display()
    )]
    Incomplete { root: PathBuf, missing: PathBuf },
    #[error("cannot open pinned map {}", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("cannot open pin {}", path.display())]
    Pinned {
        path: PathBuf,
        #[source]
        source: SyscallError,
    },
}

/// An open handle on the node's pinned maps and programs (a handle in
/// this process, not the node agent `meshbypass-node`).
pub struct NodeMaps {
    pub(crate) pins: Pins,
    pub(crate) pods: HashMap<MapData, Addr, Pod>,
    pub(crate) netns: HashMap<MapData, u64, Pod>,
    pub(crate) pairs: HashMap<MapData, SockKey, Pair>,
    pub(crate) endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    pub(crate) ports: HashMap<MapData, PortKey, Port>,
    pub(crate) pod_sockets: HashMap<MapData, u64, PodSockets>,
    pub(crate) fed: HashMap<MapData, SockKey, u32>,
    pub(crate) config: Array<MapData, Config>,
    pub(crate) counters: PerCpuArray<MapData, CounterBlock>,
    /// `mb_senders`: sockets whose sends may be redirected.
    pub(crate) senders: SockHash<MapData, SockKey>,
    /// `mb_targets`: sockets data may be redirected into.
    pub(crate) targets: SockHash<MapData, SockKey>,
}

/// The stamp: `None` when `mb_config` is not pinned.
pub(crate) fn read_stamp(pins: &Pins) -> Result<Option<Config>, OpenError> {
    if !pins.map(pins::MAP_CONFIG).exists() {
        return Ok(None);
    }
    let config: Array<MapData, Config> = match open_map(pins, pins::MAP_CONFIG) {
        Ok(c) => c,
        // Another layout's mb_config has another value size.
        Err(OpenError::Map { source, .. }) if matches!(*source, MapError::InvalidValueSize { .. }) => {
            return Err(OpenError::LayoutMismatch {
                root: pins.root().into(),
                found: "unknown (mb_config differs)".into(),
            });
        }
        Err(e) => return Err(e),
    };
    config
        .get(&0, 0)
        .map(Some)
        .map_err(map_err(pins, pins::MAP_CONFIG))
}

/// Rewrites the single entry of `mb_config` with `change`.
pub(crate) fn update_config(
    config: &mut Array<MapData, Config>,
    change: impl FnOnce(&mut Config),
) -> Result<(), MapError> {
    let mut cfg = config.get(&0, 0)?;
    change(&mut cfg);
    config.set(0, cfg, 0)
}

/// An error of the map pinned as `name`.
pub(crate) fn map_err(pins: &Pins, name: &str) -> impl Fn(MapError) -> OpenError {
    let path = pins.map(name);
    move |e| OpenError::Map {
        path: path.clone(),
        source: Box::new(e),
    }
}

pub(crate) fn open_map<T>(pins: &Pins, name: &str) -> Result<T, OpenError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let err = map_err(pins, name);
    let data = MapData::from_pin(pins.map(name)).map_err(&err)?;
    T::try_from(Map::from_map_data(data).map_err(&err)?).map_err(err)
}

impl NodeMaps {
    /// Opens the node's pins; they must exist with this binary's layout.
    pub fn open(root: &Path) -> Result<NodeMaps, OpenError> {
        let pins = Pins::new(root);
        match read_stamp(&pins)? {
            Some(cfg) if cfg.layout_version == LAYOUT_VERSION => Self::open_unlocked(&pins),
            Some(cfg) if cfg.layout_version != 0 => Err(OpenError::LayoutMismatch {
                root: root.into(),
                found: cfg.layout_version.to_string(),
            }),
            _ => Err(OpenError::NotLoaded { root: root.into() }),
        }
    }

    /// Opens the pins without checking the stamp: the loader holds the
    /// root's lock and has just checked or written it.
    pub(crate) fn open_unlocked(pins: &Pins) -> Result<NodeMaps, OpenError> {
        if let Some(missing) = pins.maps_and_progs().find(|path| !path.exists()) {
            return Err(OpenError::Incomplete {
                root: pins.root().into(),
                missing,
            });
        }
        Ok(NodeMaps {
            pins: pins.clone(),
            pods: open_map(pins, pins::MAP_PODS)?,
            netns: open_map(pins, pins::MAP_NETNS)?,
            pairs: open_map(pins, pins::MAP_PAIRS)?,
            endpoints: open_map(pins, pins::MAP_ENDPOINTS)?,
            ports: open_map(pins, pins::MAP_PORTS)?,
            pod_sockets: open_map(pins, pins::MAP_POD_SOCKETS)?,
            fed: open_map(pins, pins::MAP_FED)?,
            config: open_map(pins, pins::MAP_CONFIG)?,
            counters: open_map(pins, pins::MAP_COUNTERS)?,
            senders: open_map(pins, pins::MAP_SENDERS)?,
            targets: open_map(pins, pins::MAP_TARGETS)?,
        })
    }

    pub fn root(&self) -> &Path {
        self.pins.root()
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// The node-wide settings.
    pub fn config(&self) -> Result<Config, MapError> {
        self.config.get(&0, 0)
    }

    /// Overwrites the recorded object hash: tests pretend that another build
    /// loaded the pins (the next `load` then replaces the programs).
    pub fn record_object_hash(&mut self, hash: u64) -> Result<(), MapError> {
        update_config(&mut self.config, |cfg| cfg.object_hash = hash)
    }

    /// Sets `mb_config.kernel_flags` (the selftest's private roots).
    pub fn set_kernel_flags(&mut self, flags: u32) -> Result<(), MapError> {
        update_config(&mut self.config, |cfg| cfg.kernel_flags = flags)
    }

    /// Records the selftest verdict that `auto` follows (a
    /// `selftest::Report` converts into one).
    pub fn record_verdict(&mut self, verdict: impl Into<Verdict>) -> Result<(), MapError> {
        let kernel_flags = verdict.into().kernel_flags();
        let probed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        update_config(&mut self.config, |cfg| {
            cfg.kernel_flags = kernel_flags;
            cfg.probed_at = probed_at;
        })
    }

    /// Sockets currently in the socket maps: (senders, targets), i.e.
    /// (`mb_senders`, `mb_targets`).
    pub fn socket_counts(&self) -> (usize, usize) {
        (
            self.senders.keys().filter(Result::is_ok).count(),
            self.targets.keys().filter(Result::is_ok).count(),
        )
    }

    /// Entries in the pairing maps (pairs, endpoints).
    pub fn pairing_counts(&self) -> (usize, usize) {
        (
            self.pairs.keys().filter(Result::is_ok).count(),
            self.endpoints.keys().filter(Result::is_ok).count(),
        )
    }
}

/// Read access to the datapath's state, for status, GC and tests.
impl NodeMaps {
    /// Keys of the sockets in the socket maps: (senders, targets), i.e.
    /// (`mb_senders`, `mb_targets`).
    pub fn socket_keys(&self) -> (Vec<SockKey>, Vec<SockKey>) {
        (
            self.senders.keys().filter_map(Result::ok).collect(),
            self.targets.keys().filter_map(Result::ok).collect(),
        )
    }

    /// Every pair entry: socket -> peer.
    pub fn pairs(&self) -> Vec<(SockKey, Pair)> {
        self.pairs.iter().filter_map(Result::ok).collect()
    }

    /// Every waiting endpoint.
    pub fn endpoints(&self) -> Vec<(EndpointKey, Endpoint)> {
        self.endpoints.iter().filter_map(Result::ok).collect()
    }

    /// Writes a pair entry (repair and tests).
    pub fn set_pair(&mut self, key: &SockKey, pair: &Pair) -> Result<(), MapError> {
        self.pairs.insert(key, pair, 0)
    }

    /// Removes a pair entry (repair and tests).
    pub fn remove_pair(&mut self, key: &SockKey) -> Result<(), MapError> {
        self.pairs.remove(key)
    }
}
