//! CHECK (CNI 0.4.0 and later; `cmd::dispatch` refuses it before): the pod's
//! rules, link and map entries are all there and match.

use meshbypass_ebpf::NodeMaps;

use crate::{
    config::NetConf,
    env::Attachment,
    error::CniError,
    policy::{self, Decision},
    prev, redirect,
    state::StateDir,
};

fn missing(what: String) -> CniError {
    CniError::Internal {
        action: "checking the pod",
        source: what.into(),
    }
}

pub fn run(att: &Attachment, config: &NetConf) -> Result<(), CniError> {
    let prev_result = config.prev_result.as_ref().ok_or(CniError::InvalidConfig {
        problem: "prevResult is missing",
        fix: "CHECK needs the result of ADD as prevResult",
    })?;
    // The pod's own settings (API policy: its annotations) are what ADD used.
    let redirect = match policy::for_config(config)?.decide(&att.args)? {
        Decision::Skip { .. } => return Ok(()),
        Decision::Mesh { redirect, .. } => redirect,
    };
    let netns = att
        .netns
        .as_deref()
        .filter(|p| p.exists())
        .ok_or_else(|| CniError::Netns {
            netns: att.netns.clone().unwrap_or_default(),
            source: "the pod's network namespace does not exist".into(),
        })?;
    for family in redirect::families(&prev::ips(prev_result)) {
        let installed = redirect::installed(netns, family)?;
        if !installed.is_complete() {
            return Err(CniError::Iptables {
                action: "find",
                family,
                source: format!(
                    "the redirect chains or jumps are missing (found chains {:?}, jumps {}); delete and \
                     re-create the pod",
                    installed.chains,
                    installed.jumps.len()
                )
                .into(),
            });
        }
    }
    let state = StateDir::new(&config.state_dir)
        .load(&att.container_id)
        .map_err(|e| CniError::Internal {
            action: "reading the pod's record",
            source: Box::new(e),
        })?
        .ok_or_else(|| missing(format!("no record of ADD for {}", att.container_id.as_str())))?;
    let Some(cookie) = state.netns_cookie else {
        return Ok(()); // ADD skipped acceleration; the redirect is all there is.
    };
    let node = NodeMaps::open(&config.bpf_root).map_err(|e| CniError::Bpf {
        action: "open the node's maps",
        source: Box::new(e),
    })?;
    if !node.links().iter().any(|l| *l == att.container_id.stem()) {
        return Err(missing(format!(
            "the bypass link {} is missing",
            node.pins().link(&att.container_id.stem()).display()
        )));
    }
    let pod = node
        .pod_by_netns(cookie)
        .ok_or_else(|| missing(format!("the pod (netns cookie {cookie}) is not registered")))?;
    let want_ips = {
        let mut v = state.ips.clone();
        v.sort();
        v
    };
    if pod.ips != want_ips
        || pod.outbound_port != redirect.outbound_port
        || pod.inbound_port != redirect.inbound_port
        || pod.proxy_uid != Some(redirect.proxy_uid)
        || Some(pod.mode) != state.mode
    {
        return Err(missing(format!(
            "the registered pod differs from the configuration: {pod:?}"
        )));
    }
    Ok(())
}
