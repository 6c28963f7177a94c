//! The per-pod bypass through the ebpf library: find the pod's cgroup, load
//! or reuse the node's maps (shared loader), attach the sockops program with
//! a link pinned under the container ID, register the pod's IPs with its
//! netns cookie and redirect ports. Anything missing skips acceleration with
//! a warning: the pod must start, on the plain stack if need be.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use log::warn;
use meshbypass_ebpf::{Mode, NodeMaps, PodEntry, attach::valid_link_name, maps::OpenError, pins::Pins};

use crate::{cgroup, config::NetConf, env::Attachment, error::CniError};

/// What ADD did about acceleration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accelerated {
        netns_cookie: u64,
        cgroup: PathBuf,
        mode: Mode,
    },
    Skipped {
        reason: String,
    },
}

fn skipped(reason: String) -> Outcome {
    warn!("acceleration skipped: {reason}");
    Outcome::Skipped { reason }
}

/// Attaches and registers; never fails the ADD.
pub fn attach(config: &NetConf, att: &Attachment, ips: &[IpAddr], cookie: u64) -> Outcome {
    let mode = config.acceleration;
    if mode == Mode::Off {
        return Outcome::Skipped {
            reason: "acceleration is off".into(),
        };
    }
    let Some(uid) = &att.args.pod_uid else {
        return skipped("CNI_ARGS has no K8S_POD_UID, so the pod's cgroup is unknown".into());
    };
    let root = match cgroup::resolve_root(&config.cgroup_root) {
        Ok(r) => r,
        Err(e) => return skipped(format!("{e}")),
    };
    let pod_cgroup = match cgroup::find_pod_cgroup(&root, uid) {
        Ok(c) => c.path,
        Err(e) => return skipped(format!("{e}")),
    };
    // Opening existing pins needs no lock; only the first pod on a node
    // goes through the shared loader.
    let opened = match NodeMaps::open(&config.bpf_root) {
        Err(OpenError::NotLoaded { .. }) => meshbypass_ebpf::load(&config.bpf_root)
            .map(|(node, _)| node)
            .map_err(|e| e.to_string()),
        other => other.map_err(|e| e.to_string()),
    };
    let mut node = match opened {
        Ok(node) => node,
        Err(e) => return skipped(format!("the node's maps cannot be loaded: {e}")),
    };
    let stem = att.container_id.stem();
    let id = stem.as_str();
    if let Err(e) = node.attach_cgroup(&pod_cgroup, id) {
        return skipped(format!("{e}"));
    }
    let entry = PodEntry {
        netns_cookie: cookie,
        ips: ips.to_vec(),
        outbound_port: config.redirect.outbound_port,
        inbound_port: config.redirect.inbound_port,
        proxy_uid: Some(config.redirect.proxy_uid),
        proxy_gid: config.redirect.proxy_gid,
        mode,
    };
    if let Err(e) = node.register_pod(&entry) {
        undo(&mut node, id, cookie);
        return skipped(format!("{e}"));
    }
    Outcome::Accelerated {
        netns_cookie: cookie,
        cgroup: pod_cgroup,
        mode,
    }
}

fn undo(node: &mut NodeMaps, id: &str, cookie: u64) {
    if let Err(e) = node.detach_cgroup(id) {
        warn!("undo: {e}");
    }
    if let Err(e) = node.unregister_pod(cookie) {
        warn!("undo: {e}");
    }
}

/// Detaches the container's link and removes the pod's entries. Maps that
/// were never loaded hold nothing to remove. Maps this plugin cannot use
/// (another layout, pins half gone) never got this pod's entries from it:
/// its link pin (if another build made one) is removed by path, the rest
/// stays with those maps, and DEL succeeds; failing it would only make the
/// runtime retry a DEL that can never do more, and keep the pod's sandbox.
pub fn remove(bpf_root: &Path, container_id: &str, cookie: Option<u64>) -> Result<(), CniError> {
    let mut node = match NodeMaps::open(bpf_root) {
        Ok(n) => n,
        Err(OpenError::NotLoaded { .. }) => return Ok(()),
        Err(e @ (OpenError::LayoutMismatch { .. } | OpenError::Incomplete { .. })) => {
            return remove_link_pin(bpf_root, container_id, &e);
        }
        Err(e) => {
            return Err(CniError::Bpf {
                action: "open the node's maps to remove the pod",
                source: Box::new(e),
            });
        }
    };
    node.detach_cgroup(container_id).map_err(|e| CniError::Bpf {
        action: "detach the pod's bypass",
        source: Box::new(e),
    })?;
    if let Some(cookie) = cookie {
        node.unregister_pod(cookie).map_err(|e| CniError::Bpf {
            action: "remove the pod's map entries",
            source: Box::new(e),
        })?;
    }
    Ok(())
}

fn remove_link_pin(bpf_root: &Path, container_id: &str, why: &OpenError) -> Result<(), CniError> {
    if !valid_link_name(container_id) {
        return Ok(());
    }
    let pin = Pins::new(bpf_root).link(container_id);
    match std::fs::remove_file(&pin) {
        Ok(()) => warn!(
            "{why}: removed the pod's link {} only; its map entries stay with those maps",
            pin.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!("{why}: the pod has nothing in them to remove")
        }
        Err(e) => {
            return Err(CniError::Bpf {
                action: "detach the pod's bypass",
                source: Box::new(e),
            });
        }
    }
    Ok(())
}
