//! How full the node's maps are: entries now and capacity (`max_entries`,
//! fixed when the maps were created). One key walk per map, so reading it
//! costs O(entries), whatever the number of pods.

use aya::maps::{MapError, MapInfo};

use crate::{maps::NodeMaps, pins};

/// One map's entries and capacity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    /// The map's pin name (`mb_senders`, ...).
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// The maps whose entries grow with pods and sockets, in the order
/// [`NodeMaps::map_usage`] reports them. `mb_sk_state` (socket storage, one
/// value per socket, no key walk) and the one-entry `mb_config` and
/// `mb_counters` are not among them.
pub const COUNTED_MAPS: [&str; 7] = [
    pins::MAP_SENDERS,
    pins::MAP_TARGETS,
    pins::MAP_PAIRS,
    pins::MAP_ENDPOINTS,
    pins::MAP_PODS,
    pins::MAP_NETNS,
    pins::MAP_PORTS,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot read the map info of {}", path.display())]
pub struct UsageError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: MapError,
}

impl NodeMaps {
    /// Entries and capacity of each of [`COUNTED_MAPS`].
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, UsageError> {
        let entries = [
            self.senders.keys().filter(Result::is_ok).count(),
            self.targets.keys().filter(Result::is_ok).count(),
            self.pairs.keys().filter(Result::is_ok).count(),
            self.endpoints.keys().filter(Result::is_ok).count(),
            self.pods.keys().filter(Result::is_ok).count(),
            self.netns.keys().filter(Result::is_ok).count(),
            self.ports.keys().filter(Result::is_ok).count(),
        ];
        COUNTED_MAPS
            .iter()
            .zip(entries)
            .map(|(name, entries)| {
                let path = self.pins.map(name);
                let info = MapInfo::from_pin(&path).map_err(|source| UsageError { path, source })?;
                Ok(MapUsage {
                    name,
                    entries: entries as u64,
                    capacity: u64::from(info.max_entries()),
                })
            })
            .collect()
    }
}
