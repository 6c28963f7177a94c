//! Every pin path under the bpf root. The plugin and the node agent both go
//! through here; nothing else names a pin.

use std::path::{Path, PathBuf};

/// The default bpf root (`bpfRoot`, `--bpf-root`).
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/meshbypass";

/// Maps, pinned by name by the loader (`LIBBPF_PIN_BY_NAME` in the C header).
pub const MAPS: [&str; 10] = [
    "mb_tx",
    "mb_rx",
    "mb_pairs",
    "mb_endpoints",
    "mb_pods",
    "mb_netns",
    "mb_config",
    "mb_counters",
    "mb_sk_state",
    "mb_ports",
];

/// Program names in the ELF object.
pub const PROG_SOCKOPS: &str = "mb_sockops";
pub const PROG_SK_MSG: &str = "mb_sk_msg";

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
