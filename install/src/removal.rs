//! Whether the agent's SIGTERM ends meshbypass on this node, or only this
//! process. A rollout, a liveness restart, a drain, a node reboot and a
//! `kubectl delete` of the DaemonSet all look the same from inside: a
//! SIGTERM. Only the last one may take the plugin out of the conflist; in
//! every other case a pod created before the next agent is up must still
//! get its redirect (DESIGN.md: the node agent fails closed).
//!
//! As istio-cni does at shutdown, the agent asks the API server for its own
//! DaemonSet (`get` on that one object: the RBAC rule names it):
//!
//! | answer | verdict |
//! |---|---|
//! | 200, no `deletionTimestamp` | keep (restart, rollout, drain) |
//! | 200 with `deletionTimestamp` (foreground deletion) | remove |
//! | 404 with a Kubernetes `Status` saying `NotFound` for this very DaemonSet | remove: it is gone |
//! | any other 404 (a proxy, an API group not served yet, another server) | keep |
//! | 401, 403 | keep: our token or our RBAC is gone, which also happens by accident (RBAC churn, an expired token); the DaemonSet may well exist |
//! | anything else, or nothing within the budget | keep: cannot tell, so fail closed |
//!
//! So removing meshbypass is: delete the DaemonSet first and let its pods
//! see that (`kubectl delete daemonset --cascade=foreground`), then the rest
//! (README, "Removing safely"); an agent that could not tell keeps the plugin,
//! and `meshbypass-node uninstall` on that node removes it.
//!
//! Outside a cluster (no service account) the answer is always "keep":
//! `meshbypass-node uninstall` is the way to remove it there.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use meshbypass_cni::kubeapi::Client;
use meshbypass_ebpf::chain::error_chain;
use serde::Deserialize;

use crate::{installer::KubeSetup, kubeconfig};

/// The longest one question may take; several fit in the budget.
const ATTEMPT: Duration = Duration::from_secs(2);
const PAUSE: Duration = Duration::from_millis(300);

/// Our DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl DaemonSetRef {
    fn path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/daemonsets/{}",
            self.namespace, self.name
        )
    }
}

impl std::fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Whether `s` is a Kubernetes object name (a DNS-1123 subdomain), so that
/// it can go into a URL path as it is.
pub fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// What to do with the plugin on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the binary, the conflist entry and the kubeconfig in place.
    Keep { why: String },
    /// Take them off the node (entry first, then binary and kubeconfig).
    Remove { why: String },
}

#[derive(Deserialize)]
struct DaemonSet {
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "deletionTimestamp")]
    deletion_timestamp: Option<String>,
}

/// The namespace a pod runs in, from its service account mount (the file
/// `namespace` beside the token, which kubelet always writes).
pub fn own_namespace(token_file: &Path) -> Option<String> {
    let file = token_file.parent()?.join("namespace");
    let ns = std::fs::read_to_string(file).ok()?.trim().to_owned();
    is_object_name(&ns).then_some(ns)
}

/// Asks the API server within `budget` (see the module's table).
pub fn verdict(kube: Option<&KubeSetup>, ds: Option<&DaemonSetRef>, budget: Duration) -> Verdict {
    let (Some(kube), Some(ds)) = (kube, ds) else {
        return Verdict::Keep {
            why: "not running in a Kubernetes pod (no service account): the plugin stays; \
                  `meshbypass-node uninstall` removes it"
                .into(),
        };
    };
    // The token may have rotated since it was last read.
    let access = kube
        .account
        .read()
        .map_err(|e| error_chain(&e))
        .and_then(|creds| {
            let doc = kubeconfig::render(&kube.server, &creds);
            meshbypass_cni::kubeconfig::parse(&doc, Path::new("/")).map_err(|e| error_chain(&e))
        });
    let client = match access {
        Ok(access) => Client::new(access),
        Err(e) => {
            return Verdict::Keep {
                why: format!(
                    "cannot ask the API server whether DaemonSet {ds} was deleted ({e}): the plugin \
                     stays (fail closed)"
                ),
            };
        }
    };
    ask(&client, ds, budget)
}

fn ask(client: &Client, ds: &DaemonSetRef, budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    let path = ds.path();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match client.get_once::<DaemonSet>(&path, left.min(ATTEMPT)) {
            Ok(found) if found.metadata.name != ds.name => format!(
                "the API server answered with an object named {:?}",
                found.metadata.name
            ),
            Ok(found) => {
                return match found.metadata.deletion_timestamp {
                    Some(at) => Verdict::Remove {
                        why: format!("DaemonSet {ds} is being deleted (since {at})"),
                    },
                    None => Verdict::Keep {
                        why: format!(
                            "DaemonSet {ds} still exists (a restart, rollout or drain): the plugin stays"
                        ),
                    },
                };
            }
            Err(e) => match (e.status(), e.status_body()) {
                (Some(404), Some(body))
                    if body.reason == "NotFound"
                        && body.details.kind == "daemonsets"
                        && body.details.name == ds.name =>
                {
                    return Verdict::Remove {
                        why: format!("DaemonSet {ds} is gone"),
                    };
                }
                (Some(401 | 403), _) => {
                    return Verdict::Keep {
                        why: format!(
                            "the API server refuses to say whether DaemonSet {ds} exists ({}): our token \
                             or RBAC is gone, by accident or with the DaemonSet; the plugin stays (fail \
                             closed); `meshbypass-node uninstall` removes it",
                            error_chain(&e)
                        ),
                    };
                }
                _ => error_chain(&e),
            },
        };
        if Instant::now() + PAUSE >= deadline {
            return Verdict::Keep {
                why: format!(
                    "cannot tell whether DaemonSet {ds} was deleted after {attempts} attempts ({last}): the \
                     plugin stays (fail closed); `meshbypass-node uninstall` removes it"
                ),
            };
        }
        log::warn!("asking for DaemonSet {ds}: {last}; trying again");
        thread::sleep(PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names() {
        for good in ["meshbypass-node", "a", "kube-system", "x.y-1"] {
            assert!(is_object_name(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a/b", "a b", "../x", "a?b"] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }

    #[test]
    fn outside_a_cluster_the_plugin_stays() {
        let v = verdict(None, None, Duration::from_secs(1));
        assert!(
            matches!(&v, Verdict::Keep { why } if why.contains("meshbypass-node uninstall")),
            "{v:?}"
        );
    }

    #[test]
    fn own_namespace_reads_the_file_beside_the_token() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let token = tmp.path().join("token");
        assert_eq!(own_namespace(&token), None);
        std::fs::write(tmp.path().join("namespace"), "meshbypass-system\n").expect("writing");
        assert_eq!(own_namespace(&token).as_deref(), Some("meshbypass-system"));
        std::fs::write(tmp.path().join("namespace"), "../etc").expect("writing");
        assert_eq!(own_namespace(&token), None);
    }
}
