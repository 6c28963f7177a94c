//! ADD: the pod's redirect (mandatory), then its bypass (best effort), then
//! the record DEL and GC need; prints the previous result unchanged.

use log::{info, warn};

use crate::{
    bypass,
    cidr::Family,
    config::Config,
    env::Env,
    error::CniError,
    policy::{self, Decision},
    prev, redirect,
    state::{PodState, StateDir},
};

pub fn run(env: &Env, config: &Config) -> Result<String, CniError> {
    let att = env.attachment.as_ref().ok_or(CniError::InvalidConfig {
        problem: "ADD without an attachment",
        fix: "set CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME",
    })?;
    let prev_result = config.prev_result.as_ref().ok_or(CniError::InvalidConfig {
        problem: "prevResult is missing",
        fix: "meshbypass is a chained plugin: list it after the primary plugin (bridge, Calico, Flannel, \
              kindnet) in a conflist",
    })?;
    let reply = prev::passthrough(prev_result, &config.cni_version).to_string();

    if let Decision::Skip { reason } = policy::for_config(config)?.decide(&att.args)? {
        info!("not meshed: {reason}");
        return Ok(reply);
    }
    let netns = att.netns.as_deref().ok_or(CniError::InvalidConfig {
        problem: "CNI_NETNS is empty",
        fix: "ADD needs the pod's network namespace",
    })?;
    if !netns.exists() {
        return Err(CniError::Netns {
            netns: netns.into(),
            source: "the network namespace does not exist".into(),
        });
    }
    let ips = prev::ips(prev_result);
    if ips.is_empty() {
        warn!("prevResult lists no IPs: only the redirect is applied");
    }
    let families = redirect::families(&ips);
    if let Err(e) = redirect::apply(netns, &config.redirect, &families) {
        // Nothing half-configured: take back whichever family went in.
        if let Err(undo) = redirect::remove(netns) {
            warn!("undo after a failed ADD: {undo}");
        }
        return Err(e);
    }

    let outcome = if ips.is_empty() {
        bypass::Outcome::Skipped {
            reason: "no pod IPs".into(),
        }
    } else {
        bypass::attach(config, att, &ips, netns)
    };
    let (cookie, cgroup, mode) = match &outcome {
        bypass::Outcome::Accelerated {
            netns_cookie,
            cgroup,
            mode,
        } => (
            Some(*netns_cookie),
            Some(cgroup.clone()),
            Some(mode.as_str().to_owned()),
        ),
        bypass::Outcome::Skipped { .. } => (None, None, None),
    };
    let state = PodState {
        container_id: att.container_id.as_str().into(),
        ifname: att.ifname.as_str().into(),
        netns: Some(netns.into()),
        pod_namespace: att.args.pod_namespace.clone(),
        pod_name: att.args.pod_name.clone(),
        pod_uid: att.args.pod_uid.as_ref().map(|u| u.as_str().to_owned()),
        ips,
        families: families.iter().map(|f| family_name(*f).to_owned()).collect(),
        netns_cookie: cookie,
        cgroup,
        mode,
    };
    if let Err(e) = StateDir::new(&config.state_dir).save(&state, &att.container_id) {
        // Without the record DEL could not find everything: undo and fail.
        if let Err(undo) = redirect::remove(netns) {
            warn!("undo after a failed ADD: {undo}");
        }
        if let Err(undo) = bypass::remove(&config.bpf_root, att.container_id.as_str(), cookie) {
            warn!("undo after a failed ADD: {undo}");
        }
        return Err(CniError::Internal {
            action: "recording the pod for DEL",
            source: Box::new(e),
        });
    }
    info!("meshed: redirect for {families:?}, bypass {outcome:?}");
    Ok(reply)
}

pub fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}
