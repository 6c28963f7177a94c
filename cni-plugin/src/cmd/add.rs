//! ADD, in four steps: decide (the pod policy), apply the redirect
//! (mandatory), attach the bypass (best effort), register what was done in
//! the record DEL, CHECK and GC read. Prints the previous result unchanged.
//!
//! The record is written before anything is touched (first ADD of a
//! sandbox), so a retry after a crash knows the netns may hold our rules.
//! From then on one guard ([`Undo`]) takes everything back if ADD fails.

use std::{net::IpAddr, path::Path, time::Instant};

use log::{info, warn};

use crate::{
    bypass::{self, Outcome},
    cidr::Family,
    config::NetConf,
    env::Attachment,
    error::CniError,
    ids::ContainerId,
    policy::{self, Decision},
    prev, redirect,
    state::{PodRecord, StateDir},
};

pub fn run(att: &Attachment, conf: &NetConf) -> Result<String, CniError> {
    let prev_result = conf.prev_result.as_ref().ok_or(CniError::InvalidConfig {
        problem: "prevResult is missing",
        fix: "meshbypass is a chained plugin: list it after the primary plugin (bridge, Calico, Flannel, \
              kindnet) in a conflist",
    })?;
    let reply = prev::in_version(prev_result, &conf.cni_version).to_string();
    let Some(conf) = decide(conf, att)? else {
        return Ok(reply);
    };
    let netns = live_netns(att)?;
    let ips = prev::ips(prev_result);
    if ips.is_empty() {
        warn!("prevResult lists no IPs: only the redirect is applied");
    }
    let families = redirect::families(&ips);
    let mut record = new_record(att, netns, &ips, &families);
    let states = StateDir::new(&conf.state_dir);

    let started = Instant::now();
    // No record: the first ADD of this sandbox, whose netns holds nothing of ours.
    let fresh = matches!(states.load(&att.container_id), Ok(None));
    if fresh {
        save(&states, &record, &att.container_id)?;
    }
    let mut undo = Undo::arm(netns, &states, &att.container_id, &conf.bpf_root);

    let cookie = redirect::apply(netns, &conf.redirect, &families, fresh)?;
    let redirect_done = started.elapsed();

    let outcome = attach_bypass(&conf, att, &ips, cookie);
    undo.bypass_attached(&outcome);

    register(&mut record, &outcome);
    save(&states, &record, &att.container_id)?;
    undo.disarm();
    info!(
        "meshed: redirect for {families:?} in {:.1} ms, bypass {outcome:?} in {:.1} ms",
        redirect_done.as_secs_f64() * 1e3,
        (started.elapsed() - redirect_done).as_secs_f64() * 1e3
    );
    Ok(reply)
}

/// The pod policy: `None` for a pod that is not meshed, else the configuration with the pod's own
/// redirect and acceleration (from its annotations, with `kubernetes.kubeconfig`).
fn decide(conf: &NetConf, att: &Attachment) -> Result<Option<NetConf>, CniError> {
    match policy::for_config(conf)?.decide(&att.args)? {
        Decision::Skip { reason } => {
            info!("not meshed: {reason}");
            Ok(None)
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
            Ok(Some(NetConf {
                redirect: *redirect,
                acceleration,
                ..conf.clone()
            }))
        }
    }
}

/// The pod's network namespace, which ADD needs to exist.
fn live_netns(att: &Attachment) -> Result<&Path, CniError> {
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
    Ok(netns)
}

/// The bypass for a pod with IPs (none: nothing to register it by).
fn attach_bypass(conf: &NetConf, att: &Attachment, ips: &[IpAddr], cookie: u64) -> Outcome {
    if ips.is_empty() {
        return Outcome::Skipped {
            reason: "no pod IPs".into(),
        };
    }
    bypass::attach(conf, att, ips, cookie)
}

/// The record before the bypass: enough for DEL to remove the redirect.
fn new_record(att: &Attachment, netns: &Path, ips: &[IpAddr], families: &[Family]) -> PodRecord {
    PodRecord {
        container_id: att.container_id.as_str().into(),
        ifname: att.ifname.as_str().into(),
        netns: Some(netns.into()),
        pod_namespace: att.args.pod_namespace.clone(),
        pod_name: att.args.pod_name.clone(),
        pod_uid: att.args.pod_uid.as_ref().map(|u| u.as_str().to_owned()),
        ips: ips.to_vec(),
        families: families.iter().map(|f| family_name(*f).to_owned()).collect(),
        netns_cookie: None,
        cgroup: None,
        mode: None,
    }
}

/// Registers the bypass in the record: DEL unregisters the pod by its netns cookie.
fn register(record: &mut PodRecord, outcome: &Outcome) {
    if let Outcome::Accelerated {
        netns_cookie,
        cgroup,
        mode,
    } = outcome
    {
        record.netns_cookie = Some(*netns_cookie);
        record.cgroup = Some(cgroup.clone());
        record.mode = Some(*mode);
    }
}

fn save(states: &StateDir, record: &PodRecord, id: &ContainerId) -> Result<(), CniError> {
    states.save(record, id).map_err(|e| CniError::Internal {
        action: "recording the pod for DEL",
        source: Box::new(e),
    })
}

/// Takes back a failed ADD, as the bridge plugin's `defer func() { if !success { ... } }()`:
/// armed once the record exists, it removes the redirect (whichever family went in), the bypass
/// (once attached) and the record when dropped, unless [`Undo::disarm`]ed. Nothing is left
/// half-configured, and without its record DEL could not find everything.
struct Undo<'a> {
    netns: &'a Path,
    states: &'a StateDir,
    id: &'a ContainerId,
    bpf_root: &'a Path,
    /// `Some` once the bypass step ran: the netns cookie it registered the pod with, if it did.
    bypass: Option<Option<u64>>,
    armed: bool,
}

impl<'a> Undo<'a> {
    fn arm(netns: &'a Path, states: &'a StateDir, id: &'a ContainerId, bpf_root: &'a Path) -> Self {
        Self {
            netns,
            states,
            id,
            bpf_root,
            bypass: None,
            armed: true,
        }
    }

    fn bypass_attached(&mut self, outcome: &Outcome) {
        self.bypass = Some(match outcome {
            Outcome::Accelerated { netns_cookie, .. } => Some(*netns_cookie),
            Outcome::Skipped { .. } => None,
        });
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = redirect::remove(self.netns) {
            warn!("undo after a failed ADD: {e}");
        }
        if let Some(cookie) = self.bypass
            && let Err(e) = bypass::remove(self.bpf_root, &self.id.stem(), cookie)
        {
            warn!("undo after a failed ADD: {e}");
        }
        if let Err(e) = self.states.remove(self.id) {
            warn!("undo after a failed ADD: {e}");
        }
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard takes the record back when dropped armed, and leaves it once disarmed.
    #[test]
    fn undo_removes_the_record_unless_disarmed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let states = StateDir::new(&dir.path().join("state"));
        let id = ContainerId::parse("c0ffee").expect("container id");
        // Neither exists: removing the redirect fails (a warning), the bypass has nothing.
        let (netns, bpf_root) = (dir.path().join("netns"), dir.path().join("bpf"));
        let record = PodRecord {
            container_id: id.as_str().into(),
            ifname: "eth0".into(),
            netns: Some(netns.clone()),
            pod_namespace: None,
            pod_name: None,
            pod_uid: None,
            ips: vec!["10.0.0.5".parse().expect("ip")],
            families: vec!["ipv4".into()],
            netns_cookie: None,
            cgroup: None,
            mode: None,
        };
        save(&states, &record, &id).expect("first record");

        Undo::arm(&netns, &states, &id, &bpf_root).disarm();
        assert_eq!(states.load(&id).expect("read"), Some(record.clone()));

        let mut undo = Undo::arm(&netns, &states, &id, &bpf_root);
        undo.bypass_attached(&Outcome::Accelerated {
            netns_cookie: 7,
            cgroup: dir.path().join("cgroup"),
            mode: meshbypass_ebpf::Mode::Auto,
        });
        drop(undo);
        assert_eq!(
            states.load(&id).expect("read"),
            None,
            "the record outlived a failed ADD"
        );
    }
}
