//! DEL: remove the redirect (when the netns still exists), the bypass link and
//! the pod's map entries, and the record. Idempotent: what is already gone is
//! not an error, and CNI_NETNS may be empty or gone. `prevResult` is never
//! read: before CNI 0.4.0 a runtime sends none, so the record ADD wrote (or
//! the live netns) is what says what to undo, in every version.

use log::{info, warn};
use meshbypass_ebpf::netns;

use super::exists;
use crate::{bypass, config::NetConf, env::Attachment, error::CniError, redirect, state::StateDir};

pub fn run(att: &Attachment, config: &NetConf) -> Result<(), CniError> {
    let states = StateDir::new(&config.state_dir);
    let state = match states.load(&att.container_id) {
        Ok(s) => s,
        Err(e) => {
            warn!("{e}: removing what can be found without it");
            None
        }
    };
    let recorded = state.as_ref().and_then(|s| s.netns.as_deref());
    let live = exists(att.netns.as_deref()).or(exists(recorded));
    if let Some(ns) = live {
        redirect::remove(ns)?;
    }
    let cookie = state.as_ref().and_then(|s| s.netns_cookie).or_else(|| {
        // No record (ADD crashed before writing it): the live netns knows.
        live.and_then(|ns| netns::cookie_of(ns).ok())
    });
    bypass::remove(&config.bpf_root, &att.container_id.stem(), cookie)?;
    states.remove(&att.container_id).map_err(|e| CniError::Internal {
        action: "removing the pod's record",
        source: Box::new(e),
    })?;
    info!(
        "removed (netns {})",
        if live.is_some() { "present" } else { "gone" }
    );
    Ok(())
}
