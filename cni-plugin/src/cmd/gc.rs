//! GC: remove what belongs to attachments not in `cni.dev/valid-attachments`:
//! their records, links, map entries (and rules, if their netns still exists).

use std::collections::HashSet;

use log::{info, warn};
use meshbypass_ebpf::{NodeMaps, maps::OpenError};

use super::exists;
use crate::{bypass, config::NetConf, error::CniError, redirect, state::StateDir};

pub fn run(config: &NetConf) -> Result<(), CniError> {
    let valid = config.valid_attachments.as_ref().ok_or(CniError::InvalidConfig {
        problem: "GC without cni.dev/valid-attachments",
        fix: "the runtime must pass the list of attachments to keep",
    })?;
    // Records and links are named by stem (the ID, or a hash for very long ones).
    let keep_stems: HashSet<String> = valid.iter().map(|a| a.container_id.stem()).collect();
    let keep: HashSet<&str> = keep_stems.iter().map(String::as_str).collect();
    let states = StateDir::new(&config.state_dir);
    let ids = states.list().map_err(|e| CniError::Internal {
        action: "listing the pod records",
        source: Box::new(e),
    })?;
    let mut kept_cookies = HashSet::new();
    for id in ids {
        let state = match states.load(&id) {
            Ok(s) => s,
            Err(e) => {
                warn!("{e}");
                None
            }
        };
        if keep.contains(id.as_str()) {
            kept_cookies.extend(state.and_then(|s| s.netns_cookie));
            continue;
        }
        if let Some(ns) = exists(state.as_ref().and_then(|s| s.netns.as_deref())) {
            redirect::remove(ns)?;
        }
        bypass::remove(
            &config.bpf_root,
            id.as_str(),
            state.as_ref().and_then(|s| s.netns_cookie),
        )?;
        states.remove(&id).map_err(|e| CniError::Internal {
            action: "removing a pod record",
            source: Box::new(e),
        })?;
        info!("gc: removed {}", id.as_str());
    }
    // Links and registrations no record accounts for (an ADD that died).
    let mut node = match NodeMaps::open(&config.bpf_root) {
        Ok(n) => n,
        Err(OpenError::NotLoaded { .. }) => return Ok(()),
        Err(e) => {
            return Err(CniError::Bpf {
                action: "open the node's maps",
                source: Box::new(e),
            });
        }
    };
    let recorded: HashSet<String> = states
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.as_str().to_owned())
        .collect();
    for link in node.links() {
        if !keep.contains(link.as_str()) && !recorded.contains(&link) {
            node.detach_cgroup(&link).map_err(|e| CniError::Bpf {
                action: "detach a leaked link",
                source: Box::new(e),
            })?;
            info!("gc: detached leaked link {link}");
        }
    }
    for pod in node.pods() {
        if !kept_cookies.contains(&pod.netns_cookie) {
            node.unregister_pod(pod.netns_cookie).map_err(|e| CniError::Bpf {
                action: "remove a leaked pod",
                source: Box::new(e),
            })?;
            info!("gc: removed leaked pod registration {}", pod.netns_cookie);
        }
    }
    Ok(())
}
