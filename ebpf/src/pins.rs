//! Every pin path under the bpf root. The plugin and the node agent both go
//! through here; nothing else names a pin.

use std::path::{Path, PathBuf};

/// The default bpf root (`bpfRoot`, `--bpf-root`).
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/meshbypass";

/// `mb_senders`: the sockets whose sends `sk_msg` may redirect (the senders);
/// the sk_msg program is attached to this map.
pub const MAP_SENDERS: &str = "mb_senders";
/// `mb_targets`: the sockets data may be redirected into (the targets).
pub const MAP_TARGETS: &str = "mb_targets";
/// socket -> the peer its sends are redirected to.
pub const MAP_PAIRS: &str = "mb_pairs";
/// connection -> its first end, waiting for the second.
pub const MAP_ENDPOINTS: &str = "mb_endpoints";
/// pod IP -> pod.
pub const MAP_PODS: &str = "mb_pods";
/// netns cookie -> pod.
pub const MAP_NETNS: &str = "mb_netns";
/// Node-wide settings and the layout stamp.
pub const MAP_CONFIG: &str = "mb_config";
/// (netns, listening port) -> what `adaptive` knows of the sockets accepted there.
pub const MAP_PORTS: &str = "mb_ports";
/// `adaptive` socket -> a peer redirected into it.
pub const MAP_FED: &str = "mb_fed";
/// netns cookie -> how many of the pod's sockets are tracked (its budget).
pub const MAP_POD_SOCKETS: &str = "mb_pod_sockets";
/// Per-CPU counters.
pub const MAP_COUNTERS: &str = "mb_counters";
/// Per-socket state (socket local storage).
pub const MAP_SK_STATE: &str = "mb_sk_state";

/// Every map, pinned by name by the loader (`LIBBPF_PIN_BY_NAME`: the
/// name is the C variable's, see `bpf/include/meshbypass_maps.h`).
pub const MAPS: [&str; 12] = [
    MAP_SENDERS,
    MAP_TARGETS,
    MAP_PAIRS,
    MAP_ENDPOINTS,
    MAP_PODS,
    MAP_NETNS,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_SK_STATE,
    MAP_PORTS,
    MAP_POD_SOCKETS,
    MAP_FED,
];

/// Program names in the ELF object, pinned under `progs/`.
pub const PROG_SOCKOPS: &str = "mb_sockops";
pub const PROG_SK_MSG: &str = "mb_sk_msg";
/// Every program.
pub const PROGS: [&str; 2] = [PROG_SOCKOPS, PROG_SK_MSG];

/// What an upgrade appends to a program's pin name while the new program
/// waits to be renamed in (bpffs refuses names with a dot).
const STAGED_SUFFIX: &str = "_new";

/// The pin layout of one bpf root.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A map pinned by name.
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Programs are pinned beside the maps, under `progs/`.
    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    /// Where an upgrade pins the new program `name` before renaming it
    /// over [`Pins::prog`].
    pub fn staged_prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(format!("{name}{STAGED_SUFFIX}"))
    }

    /// Every map and program pin (not the links), maps first.
    pub fn maps_and_progs(&self) -> impl Iterator<Item = PathBuf> + '_ {
        MAPS.iter()
            .map(|m| self.map(m))
            .chain(PROGS.iter().map(|p| self.prog(p)))
    }

    /// Per-container cgroup links, under `links/`, one pin per container ID.
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The link pin of a container; the ID must be validated by the caller
    /// (see [`crate::attach::valid_link_name`]).
    pub fn link(&self, container_id: &str) -> PathBuf {
        self.links_dir().join(container_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names above are the object's: a map or program renamed in C
    /// fails here, not at load time on a node.
    #[test]
    fn names_are_the_objects() {
        let object = aya_obj::Object::parse(crate::OBJECT).expect("the embedded object parses");
        let mut maps: Vec<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.'))
            .collect();
        maps.sort_unstable();
        let mut ours = MAPS;
        ours.sort_unstable();
        assert_eq!(
            maps, ours,
            "the object's maps (left) and pins::MAPS (right) differ"
        );
        let mut progs: Vec<&str> = object.programs.keys().map(String::as_str).collect();
        progs.sort_unstable();
        let mut ours = PROGS;
        ours.sort_unstable();
        assert_eq!(
            progs, ours,
            "the object's programs (left) and pins::PROGS (right) differ"
        );
    }
}
