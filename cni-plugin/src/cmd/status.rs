//! STATUS: can this node serve ADD? Error 50 when not, saying why.

use std::path::Path;

use meshbypass_ebpf::{NodeMaps, bpffs, maps::OpenError};

use crate::{
    cgroup,
    config::{Mode, NetConf},
    error::CniError,
};

pub fn run(config: &NetConf) -> Result<(), CniError> {
    if !on_path("iptables-restore") {
        return Err(CniError::NotAvailable {
            reason: "iptables-restore is not installed on the node",
            source: None,
        });
    }
    if config.acceleration == Mode::Off {
        return Ok(());
    }
    cgroup::resolve_root(&config.cgroup_root).map_err(|e| CniError::NotAvailable {
        reason: "no cgroup v2 hierarchy at cgroupRoot",
        source: Some(Box::new(e)),
    })?;
    match NodeMaps::open(&config.bpf_root) {
        Ok(_) => Ok(()),
        Err(OpenError::NotLoaded { .. }) if bpffs_available(&config.bpf_root) => Ok(()),
        Err(OpenError::NotLoaded { .. }) => Err(CniError::NotAvailable {
            reason: "no bpf filesystem for bpfRoot (mount -t bpf bpf /sys/fs/bpf)",
            source: None,
        }),
        Err(e) => Err(CniError::NotAvailable {
            reason: "the node's maps cannot be used",
            source: Some(Box::new(e)),
        }),
    }
}

/// The root is on bpffs, or can be created on one the loader can mount.
fn bpffs_available(root: &Path) -> bool {
    root.ancestors().any(|p| p.exists() && bpffs::is_bpffs(p)) || Path::new("/sys/fs/bpf").is_dir()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .any(|dir| dir.join(program).is_file())
}
