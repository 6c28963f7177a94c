//! ADD: the pod's redirect (mandatory), then its bypass (best effort), then
//! the record DEL and GC need; prints the previous result unchanged.

use log::{info, warn};

use crate::{
    bypass,
    cidr::Family,
    config::NetConf,
    env::Env,
    error::CniError,
    policy::{self, Decision},
    prev, redirect,
    state::{PodRecord, StateDir},
};

pub fn run(env: &Env, config: &NetConf) -> Result<String, CniError> {
    let att = env.attachment.as_ref().ok_or(CniError::InvalidConfig {
        problem: "ADD without an attachment",
        fix: "set CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME",
    })?;
    let prev_result = config.prev_result.as_ref().ok_or(CniError::InvalidConfig {
        problem: "prevResult is missing",
        fix: "meshbypass is a chained plugin: list it after the primary plugin (bridge, Calico, Flannel, \
              kindnet) in a conflist",
    })?;
    let reply = prev::in_version(prev_result, &config.cni_version).to_string();

    // The pod's own settings (from its annotations, with kubernetes.kubeconfig) replace the
    // configuration's for everything below.
    let config = &match policy::for_config(config)?.decide(&att.args)? {
        Decision::Skip { reason } => {
            info!("not meshed: {reason}");
            return Ok(reply);
        }
        Decision::Mesh {
            redirect,
            acceleration,
            reason,
        } => {
            info!(
                "meshed: {reason}; {} redirect, acceleration {acceleration}",
                redirect.mesh
            );
            NetConf {
                redirect: *redirect,
                acceleration,
                ..config.clone()
            }
        }
    };
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
    let states = StateDir::new(&config.state_dir);
    let mut state = PodRecord {
        container_id: att.container_id.as_str().into(),
        ifname: att.ifname.as_str().into(),
        netns: Some(netns.into()),
        pod_namespace: att.args.pod_namespace.clone(),
        pod_name: att.args.pod_name.clone(),
        pod_uid: att.args.pod_uid.as_ref().map(|u| u.as_str().to_owned()),
        ips: ips.clone(),
        families: families.iter().map(|f| family_name(*f).to_owned()).collect(),
        netns_cookie: None,
        cgroup: None,
        mode: None,
    };
    // No record: the first ADD of this sandbox, whose netns holds nothing of
    // ours. The record goes first, so a retry after a crash knows better.
    let started = std::time::Instant::now();
    let fresh = matches!(states.load(&att.container_id), Ok(None));
    if fresh {
        states
            .save(&state, &att.container_id)
            .map_err(|e| CniError::Internal {
                action: "recording the pod for DEL",
                source: Box::new(e),
            })?;
    }
    let applied = redirect::apply(netns, &config.redirect, &families, fresh);
    let netns_cookie = match applied {
        Ok(cookie) => cookie,
        Err(e) => {
            // Nothing half-configured: take back whichever family went in.
            if let Err(undo) = redirect::remove(netns) {
                warn!("undo after a failed ADD: {undo}");
            }
            if let Err(undo) = states.remove(&att.container_id) {
                warn!("undo after a failed ADD: {undo}");
            }
            return Err(e);
        }
    };

    let redirect_done = started.elapsed();
    let outcome = if ips.is_empty() {
        bypass::Outcome::Skipped {
            reason: "no pod IPs".into(),
        }
    } else {
        bypass::attach(config, att, &ips, netns_cookie)
    };
    let cookie = match &outcome {
        bypass::Outcome::Accelerated {
            netns_cookie,
            cgroup,
            mode,
        } => {
            state.netns_cookie = Some(*netns_cookie);
            state.cgroup = Some(cgroup.clone());
            state.mode = Some(*mode);
            Some(*netns_cookie)
        }
        bypass::Outcome::Skipped { .. } => None,
    };
    if let Err(e) = states.save(&state, &att.container_id) {
        // Without the record DEL could not find everything: undo and fail.
        if let Err(undo) = redirect::remove(netns) {
            warn!("undo after a failed ADD: {undo}");
        }
        if let Err(undo) = bypass::remove(&config.bpf_root, &att.container_id.stem(), cookie) {
            warn!("undo after a failed ADD: {undo}");
        }
        if let Err(undo) = states.remove(&att.container_id) {
            warn!("undo after a failed ADD: {undo}");
        }
        return Err(CniError::Internal {
            action: "recording the pod for DEL",
            source: Box::new(e),
        });
    }
    info!(
        "meshed: redirect for {families:?} in {:.1} ms, bypass {outcome:?} in {:.1} ms",
        redirect_done.as_secs_f64() * 1e3,
        (started.elapsed() - redirect_done).as_secs_f64() * 1e3
    );
    Ok(reply)
}

pub fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}
